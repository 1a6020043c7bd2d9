"""The ``rlhf`` command line.

``rlhf list`` shows what the plugins registered (algorithms, tasks, rewards) and which
plugins failed to load. ``rlhf rollout`` runs the embedded default vector env with the
reference model as the policy and prints each finished episode. ``rlhf train`` trains one
algorithm on one task; ``rlhf bench`` runs a benchmark suite of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KINDS = ("algorithms", "tasks", "rewards", "generators")


# -- rlhf list ---------------------------------------------------------------------------
def format_listing(desc: dict[str, Any]) -> str:
    """Plain-text tables, one per kind, of a ``PluginHost.describe()`` structure."""
    lines: list[str] = []
    for kind in KINDS:
        entries = desc.get(kind, [])
        lines.append(f"{kind} ({len(entries)})")
        if not entries:
            lines.append("  (none)")
        width = max([len(e["name"]) for e in entries] + [4])
        for e in entries:
            lines.append(f"  {e['name']:<{width}}  plugin: {e['plugin']}")
        lines.append("")
    failed = desc.get("failed", [])
    if failed:
        lines.append(f"failed plugins ({len(failed)})")
        for f in failed:
            lines.append(f"  {f['plugin']}: {f['error']}")
    return "\n".join(lines).rstrip() + "\n"


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registries (text table or ``--json``)."""
    import plugins  # imported here so ``rlhf --help`` stays cheap

    desc = plugins.get_host().describe()
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        print(format_listing(desc), end="")
    return 0


# -- rlhf rollout ---------------------------------------------------------------------------
def run_rollout(*args, **kwargs):
    """``rlhf_env.rollout_command.run_rollout``: the env layer's rollout path, with the reference as policy."""
    from rlhf_env.rollout_command import run_rollout

    return run_rollout(*args, **kwargs)


def clip(text: str, width: int) -> str:
    """``repr`` of ``text`` cut to about ``width`` characters (cut before quoting)."""
    if len(text) > width:
        text = text[: width - 1] + "\u2026"
    return repr(text)


def format_episode(i: int, ep: Episode) -> str:
    return (
        f"episode {i:>3}  prompt={clip(ep.prompt, 32):<36} completion={clip(ep.completion, 40):<44} "
        f"score={ep.score:.4f}  kl={ep.kl:+.4f}  return={ep.ret:+.4f}"
    )


def format_summary(result: RolloutResult) -> str:
    eps = result.episodes
    mean_score = float(np.mean([e.score for e in eps])) if eps else 0.0
    mean_return = float(np.mean([e.ret for e in eps])) if eps else 0.0
    rate = result.tokens / result.seconds if result.seconds > 0 else float("inf")
    return (
        f"summary: episodes={len(eps)}  mean_score={mean_score:.4f}  "
        f"mean_return={mean_return:+.4f}  tokens/s={rate:.1f}"
    )


def cmd_rollout(args: argparse.Namespace) -> int:
    """Print every finished episode, then a summary line."""
    a = args
    result = run_rollout(a.episodes, a.num_envs, a.max_new_tokens, a.beta, a.seed, a.task, a.model, torch_dtype(a.dtype))
    for i, ep in enumerate(result.episodes):
        print(format_episode(i, ep))
    print(format_summary(result))
    return 0


# -- rlhf base-model ---------------------------------------------------------------------
def cmd_base_model(args: argparse.Namespace) -> int:
    """Build or load a task's base model; print its size, build time and eval figures."""
    from rlhf_env.tasks import evaluate, get_task
    from rlhf_env.tasks.base_models import build_base_model, load_base_model

    task = get_task(args.task)
    path = args.model or build_base_model(task, force=args.force)
    info_file = Path(path) / "build_info.json"
    built = json.loads(info_file.read_text()) if info_file.exists() else {}
    model, tokenizer = load_base_model(task, path, dtype=torch_dtype(args.dtype))
    n = args.eval_prompts  # "base-model gold": the first n eval prompts, as the bench's base row
    sampled, greedy = evaluate(task, model, tokenizer, n=n), evaluate(task, model, tokenizer, n=n, greedy=True)
    report = {
        "task": task.name, "path": str(path), "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": built.get("build_seconds"), "eval_prompts": sampled["n"],
        "gold_mean_sampled": round(sampled["gold_mean"], 4), "gold_mean_greedy": round(greedy["gold_mean"], 4),
        "examples": sampled["examples"],
    }  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>18}: {value}")
    return 0


# -- rlhf train ---------------------------------------------------------------------------
def _saved_task(name: str, knobs: dict[str, Any]):
    """Task ``name`` built with the knobs a run saved (those its factory still takes)."""
    import plugins
    from algorithms.overrides import signature_types
    from rlhf_env.tasks import get_task

    takes = signature_types(plugins.get_host().tasks.get(name))
    return get_task(name, **{k: v for k, v in knobs.items() if takes is None or k in takes})


def cmd_train(args: argparse.Namespace) -> int:
    """Train a registered algorithm on a registered task; metrics, TensorBoard, checkpoints in --out.

    ``--resume`` continues the run in --out with its saved algorithm, task, model, seed, config and
    step budget; flags given again must agree with them (or ``--override`` changes them).
    """
    import plugins
    from rlhf_env.tasks import get_task

    # The CLI is the top layer: it may use the training loop that the algorithms layer provides.
    from algorithms.loop import train
    from algorithms.overrides import split_assignments, typed_overrides
    from algorithms.runfolder import read_run_config

    saved = (read_run_config(Path(args.out)) if args.resume and Path(args.out).is_dir() else None) or {}
    algo, task_name = args.algo or saved.get("algorithm"), args.task or saved.get("task")
    if not algo or not task_name:
        raise ValueError("--algo and --task are required to start a run (--resume takes them from the run in --out)")
    spec = plugins.get_host().algorithms.get(algo)  # unknown names list the registered ones
    if task_name == saved.get("task"):
        task = _saved_task(task_name, saved.get("task_config") or {})
    else:
        task = get_task(task_name)
    config = typed_overrides(spec.Config, split_assignments(args.set), from_text=True, where="--set")
    steps = args.steps or (saved.get("budget") or {}).get("steps") or 50
    seed = args.seed if args.seed is not None else saved.get("seed", 0)
    model = args.model if args.model is not None else saved.get("model")
    run = dict(steps=steps, seed=seed, model_path=model, config=config, resume=args.resume, override=args.override)
    run.update(eval_every=args.eval_every, device=args.device, dtype=torch_dtype(args.dtype), algo_name=algo)
    records = train(spec, task, args.out, **run)
    evals = [r for r in records if "reward/gold" in r]
    if evals:
        last = evals[-1]
        print(f"{algo} on {task.name}: step {last['step'] + 1}  reward/gold={last['reward/gold']:.4f}  "
              f"objective/kl_eval={last['objective/kl_eval']:.4f}  ({last['time/elapsed_s']:.1f}s)  -> {args.out}")
    return 0


# -- rlhf bench ---------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite (algorithms × tasks × seeds, equal budgets); tables and plots in --out."""
    # The CLI is the top layer: the benchmark runner sits on the algorithms.
    from algorithms.runfolder import claim_run_folder
    from benchmarks.report import write_report
    from benchmarks.runner import run_suite, suite_device
    from benchmarks.suite import load_suite

    suite = load_suite(args.suite)
    if args.baseline:
        from benchmarks.trl_baseline import require_trl

        require_trl()  # before the suite runs, not after
    suite_device(suite.device)  # a device this machine lacks fails before the folder is touched
    out = Path(args.out or Path("runs") / "bench" / suite.name)
    print(f"rlhf bench: suite {suite.name!r} ({suite.path}) -> {out}")
    t0 = time.perf_counter()
    with claim_run_folder(out):  # one bench at a time writes a results folder
        results = run_suite(suite, out, workers=args.workers, progress=not args.no_progress)
        if args.baseline:
            from benchmarks.trl_baseline import run_trl_baseline

            run_trl_baseline(suite, out, progress=not args.no_progress)  # failures are recorded in the table
        paths = write_report(suite, out, total_s=time.perf_counter() - t0)
    print(Path(paths["markdown"]).read_text())
    failed = [r for r in results if r.get("status") != "ok"]
    print(f"{len(results) - len(failed)} of {len(results)} cells ok in {(time.perf_counter() - t0) / 60:.1f} min; "
          + ", ".join(str(p) for p in paths.values()))  # fmt: skip
    return 1 if failed else 0


# -- entry point -------------------------------------------------------------------------
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str | None):
    """``--dtype`` -> a torch dtype (None: as the checkpoint is saved)."""
    import torch  # here, so ``rlhf --help`` stays cheap

    return getattr(torch, name) if name else None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF as a Gymnasium environment.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", parents=[common], help="show registered algorithms, tasks and rewards")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rollout", parents=[common], help="roll the default env with the reference policy")
    p.add_argument("--episodes", type=positive_int, default=8)
    p.add_argument("--num-envs", type=positive_int, default=4)
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: 24, or the task's")
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, help="a registered task (default: the embedded default env)")
    p.add_argument("--model", default=None, help="local HF checkpoint: the task's base model, or the default env's")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (log-probs stay float32)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("base-model", parents=[common], help="build (or load) a task's base model and evaluate it")
    p.add_argument("--task", required=True)
    p.add_argument("--model", default=None, help="evaluate this local HF checkpoint instead")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--eval-prompts", type=positive_int, default=64, help="evaluate on the first N eval prompts")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (log-probs stay float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_base_model)
    p = sub.add_parser("train", parents=[common], help="train an algorithm on a task")
    p.add_argument("--algo", default=None, help="a registered algorithm (required unless --resume)")
    p.add_argument("--task", default=None, help="a registered task (required unless --resume)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, tb/, checkpoint/")
    p.add_argument("--model", default=None, help="local HF causal LM replacing the task's base model")
    p.add_argument("--steps", type=positive_int, default=None, help="default: 50, or the resumed run's")
    p.add_argument("--seed", type=int, default=None, help="default: 0, or the resumed run's")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, with its settings")
    p.add_argument("--override", action="store_true", help="with --resume: change the run's settings (recorded in it)")
    p.add_argument("--eval-every", type=positive_int, default=10)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (log-probs stay float32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="algorithm config override")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", parents=[common], help="compare algorithms on tasks over seeds at equal budgets")
    p.add_argument("--suite", default="default", help="a suite TOML file, or a shipped suite: default, quick, gpu")
    p.add_argument("--out", default=None, help="results directory (default: runs/bench/<suite>); rerun to resume")
    p.add_argument("--workers", type=int, default=None, help="cells at once (default: the suite's; 0: in-process)")
    p.add_argument("--baseline", choices=["trl"], default=None, help="also run TRL's GRPO/DPO trainers (extra: compare)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse exits with 2 on bad usage).

    The one place where exceptions become messages: a user's mistake, or a failure the user can
    act on, is one line ``rlhf <command>: error: ...`` and exit code 1; Ctrl-C says how to resume
    (exit code 130). ``--debug`` lets the traceback through instead.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        _show_run_warnings(args.command)
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"rlhf {args.command}: {interrupted(args)}", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.debug:
                raise
            print(f"rlhf {args.command}: error: {describe_error(exc)}", file=sys.stderr)
            return 1


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C says: how to pick up where the command stopped."""
    if args.command == "bench" or (args.command == "train" and args.resume):
        return "interrupted; run the same command to resume"
    if args.command == "train":
        return "interrupted; run the same command with --resume to continue from the last checkpoint"
    return "interrupted"


# Kinds of errors that are the user's to fix (bad input, missing files, a busy folder, a stopped
# run); their message says what is wrong. Anything else is a bug, here or in a plugin.
USER_ERRORS = (ValueError, KeyError, OSError, RuntimeError)


def describe_error(exc: BaseException) -> str:
    """One line for an exception."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] ..."
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, USER_ERRORS) and text and type(exc) is not KeyError:
        return text
    return f"{type(exc).__name__}: {text} (an internal error; --debug shows the traceback)"


def _show_run_warnings(command: str) -> None:
    """Print run-folder repairs (``RunWarning``) as ``rlhf <command>: warning: ...`` lines, every time."""
    from rlhf_env.errors import RunWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RunWarning):
            print(f"rlhf {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.simplefilter("always", RunWarning)
    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
