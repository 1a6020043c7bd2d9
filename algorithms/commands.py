"""The algorithms layer's ``rlhf train`` command (registered in ``rlhf_env.algorithms.builtins``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.commands import DTYPES, chat_template_argument, positive_int, torch_dtype
from rlhf_env.errors import SettingError
from rlhf_env.plugins.cli import Command


# -- rlhf train ---------------------------------------------------------------------------
def _saved_task(name: str, knobs: dict[str, Any]):
    """Task ``name`` built with the knobs a run saved (those it still takes, the universal ones too)."""
    from rlhf_env.tasks import task_from_spec

    return task_from_spec(name, knobs)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a registered algorithm on a registered task; metrics, TensorBoard, checkpoints in --out.

    ``--resume`` continues the run in --out with its saved algorithm, task, model, seed, config and
    step budget; flags given again must agree with them (or ``--override`` changes them).
    """
    from rlhf_env import plugins

    # The CLI is the top layer: it may use the training loop that the algorithms layer provides.
    from rlhf_env.algorithms.run.loop import train
    from rlhf_env.algorithms.run.overrides import split_assignments, typed_overrides
    from rlhf_env.algorithms.run.runfolder import read_run_config
    from rlhf_env.tasks import parse_task_spec, task_from_spec

    saved = (read_run_config(Path(args.out)) if args.resume and Path(args.out).is_dir() else None) or {}
    algo, task_spec = args.algo or saved.get("algorithm"), args.task or saved.get("task")
    if not algo or not task_spec:
        raise SettingError("--algo and --task are required to start a run (--resume takes them from the run in --out)")
    spec = plugins.get_host().algorithms.get(algo)  # unknown names list the registered ones
    # Resuming the same task: its saved knobs, those given again overriding them (a change is then refused).
    same = parse_task_spec(task_spec)[0] == saved.get("task")
    task = task_from_spec(task_spec, saved.get("task_config") if same else None, args.max_new_tokens)
    config = typed_overrides(spec.Config, split_assignments(args.set), from_text=True, where="--set")
    steps = args.steps or (saved.get("budget") or {}).get("steps") or 50
    seed = args.seed if args.seed is not None else saved.get("seed", 0)
    model = args.model if args.model is not None else saved.get("model")
    reward = args.reward if args.reward is not None else saved.get("reward")
    chat_template = args.chat_template or saved.get("chat_template", "auto")
    generator = args.generator if args.generator is not None else saved.get("generator")
    run = dict(steps=steps, seed=seed, model_path=model, config=config, resume=args.resume, override=args.override)
    run.update(
        eval_every=args.eval_every, device=args.device, dtype=torch_dtype(args.dtype), algo_name=algo, reward=reward
    )
    run["chat_template"] = chat_template
    run.update(generator=generator)  # None: kv_cache
    run.update(
        backend=args.backend, lora_settings=_lora_settings(args, saved), fsdp=args.fsdp or saved.get("fsdp", False)
    )
    records = train(spec, task, args.out, **run)
    evals = [r for r in records if M.REWARD_GOLD in r]
    if evals:
        last = evals[-1]
        proxy = f"{M.REWARD_PROXY}={last[M.REWARD_PROXY]:.4f}  " if M.REWARD_PROXY in last else ""
        print(
            f"{algo} on {task.name}: step {last['step'] + 1}  {M.REWARD_GOLD}={last[M.REWARD_GOLD]:.4f}  {proxy}"
            f"{M.OBJECTIVE_KL_EVAL}={last[M.OBJECTIVE_KL_EVAL]:.4f}  ({last[M.TIME_ELAPSED_S]:.1f}s)  -> {args.out}"
        )
    return 0


def _lora_settings(args: argparse.Namespace, saved: dict[str, Any]):
    """The run's LoRA settings: from the flags, or (resuming without them) the saved ones; None: full fine-tuning."""
    from rlhf_env.algorithms.scale.lora import LoraSettings

    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_dropout is not None or args.lora_target_modules is not None:
            raise SettingError("--lora-alpha, --lora-dropout and --lora-target-modules need --lora-rank")
        return LoraSettings.from_dict(saved["lora"]) if saved.get("lora") else None
    targets = args.lora_target_modules
    targets = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets is not None else None
    return LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout or 0.0, targets)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algo", default=None, help="a registered algorithm (required unless --resume)")
    p.add_argument(
        "--task",
        default=None,
        help="a registered task, NAME or NAME:KEY=VALUE,... with its knobs (required unless --resume)",
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="completion length limit (default: the task's)"
    )
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, tb/, checkpoint/")
    p.add_argument("--model", default=None, help="local HF causal LM replacing the task's base model")
    p.add_argument(
        "--reward",
        default=None,
        help="what online algorithms optimise: gold (the task's, default), a registered reward "
        "(NAME or NAME:KEY=VALUE,...), a reward model folder or a reward_model run folder; gold is always evaluated",
    )
    chat_template_argument(p, default=None)
    p.add_argument(
        "--generator",
        default=None,
        metavar="NAME",
        help="the registered generation backend rollouts sample with (see rlhf list; default: kv_cache, "
        "or the resumed run's); one without exact log-probs is corrected (rollout/logprob_diff)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="default: 50, or the resumed run's")
    p.add_argument("--seed", type=int, default=None, help="default: 0, or the resumed run's")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, with its settings")
    p.add_argument("--override", action="store_true", help="with --resume: change the run's settings (recorded in it)")
    p.add_argument("--eval-every", type=positive_int, default=10)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="bfloat16/float16: mixed precision (float32 weights and Adam state, autocast compute, the reference "
        "stored low); default: weights as saved. Log-probs stay float32",
    )
    p.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default=None,
        help="data-parallel backend under torchrun (default: nccl on CUDA, gloo on CPU); "
        "without torchrun, --backend gloo is a 1-rank data-parallel run (row-seeded sampling)",
    )
    p.add_argument(
        "--fsdp", action="store_true", help="under torchrun: shard the policy with FSDP2 (sharded checkpoints)"
    )
    p.add_argument("--lora-rank", type=positive_int, default=None, help="train LoRA adapters of rank R (PEFT)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale α (update (α/r)·BA; default 2R)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    p.add_argument(
        "--lora-target-modules",
        default=None,
        metavar="NAMES",
        help="comma-separated linear layer names to adapt (default: every linear layer but the output head)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="algorithm config override")


def _train_interrupted(args: argparse.Namespace) -> str:
    if args.resume:
        return "interrupted; run the same command to resume"
    return "interrupted; run the same command with --resume to continue from the last checkpoint"


TRAIN = Command("train an algorithm on a task", _train_arguments, cmd_train, _train_interrupted)


# -- rlhf export-lora ---------------------------------------------------------------------
def cmd_export_lora(args: argparse.Namespace) -> int:
    """Merge a LoRA run's adapters into its base model; OUT is a plain checkpoint (a --model for any command)."""
    from rlhf_env.algorithms.scale.lora import check_destination, export, run_settings

    saved = run_settings(args.run)  # a LoRA run, and a destination that overwrites nothing, before any loading
    check_destination(args.run, args.out)
    task = _saved_task(saved["task"], saved.get("task_config") or {})
    print(f"merged adapters of {args.run} -> {export(args.run, args.out, task)}")
    return 0


def _export_lora_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder trained with --lora-rank")
    p.add_argument("out", help="folder for the merged checkpoint")


EXPORT_LORA = Command("merge a LoRA run's adapters into its base model", _export_lora_arguments, cmd_export_lora)
