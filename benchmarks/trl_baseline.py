"""``rlhf bench --baseline trl``: TRL's GRPOTrainer and DPOTrainer beside our grpo and dpo.

For every task and seed of the suite whose ``grpo`` / ``dpo`` cell finished, TRL trains the
same base model on the same data with the same hyperparameters for the same number of our
iterations, then the result is evaluated exactly as our cells are (``evaluate_policy``:
gold reward and KL on the held-out prompts). Results go to
``runs/<task>/trl_<algo>/seed<k>/result.json`` (TRL's figures, and ours under ``ours``, both
named as in ``rlhf_env.algorithms.run.metrics``); the report puts them side by side.

- GRPO: one of our iterations samples ``num_prompts × group_size`` completions and takes
  ``num_minibatches`` optimizer steps on them (per epoch). TRL is set up the same way:
  ``steps_per_generation = num_minibatches`` minibatches of ``num_prompts × group_size /
  num_minibatches`` completions, ``num_generations = group_size``, ``beta = kl_coef``,
  ``epsilon = clip_eps``, constant learning rate, T = 1 sampling, the gold reward, and
  dropout off (GPT-2 configs default to 0.1; our trainers keep models in eval mode, and
  TRL's GRPO leaves dropout on unless told, which alone costs it most of its progress).
- DPO: the pairs our DPO draws (``task.preference_pairs`` with the same annotator, count
  and seed), ``batch_size`` pairs per step, ``beta``, constant learning rate.

TRL's GRPO and DPO score left-padded batches without ``position_ids``; a model with learned
absolute positions (GPT-2, like our tiny models) then sees every padded row's tokens at
shifted positions when TRL computes training log-probs, though ``generate`` placed them
correctly. ``mask_positions`` gives TRL's copies of the model positions from the attention
mask (what TRL's own PPO does), so the comparison is of the algorithms, not of that gap.

Needs the ``compare`` extra (``pip install -e ".[compare]"``).
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench.cells import _write_result, cell_dir, read_result, run_dir, suite_device
from rlhf_env.bench.suite import Cell, Suite
from rlhf_env.errors import MissingExtraError, TrainingStoppedError
from rlhf_env.generation import DEFAULT_GENERATOR

ALGOS = ("grpo", "dpo")


def require_trl():
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError('--baseline trl needs TRL: pip install -e ".[compare]"') from exc
    return trl


def trl_dir(out: Path, cell: Cell) -> Path:
    return run_dir(out, cell.task.label, f"trl_{cell.algorithm}", cell.seed)


def mask_positions(model):
    """Make ``model`` derive missing ``position_ids`` from the attention mask (left padding safe).

    Done by swapping in a subclass, so copies TRL makes (its reference model) keep it.
    """
    base = type(model)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if (
            position_ids is None
            and attention_mask is not None
            and input_ids is not None
            and attention_mask.shape == input_ids.shape
        ):
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return base.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )

    model.__class__ = type(f"MaskPositions{base.__name__}", (base,), {"forward": forward})
    return model


def _common_args(out_dir: Path, seed: int, device, lr: float, max_steps: int, max_grad_norm: float) -> dict[str, Any]:
    return dict(
        output_dir=str(out_dir),
        seed=seed,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=max_steps,
        max_grad_norm=max_grad_norm,
        weight_decay=0.0,
        logging_steps=max(1, max_steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=device.type != "cuda",
        bf16=device.type == "cuda",
        gradient_accumulation_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        disable_dropout=True,
    )  # our trainers keep models in eval mode: no dropout


def grpo_trainer(task, model, tokenizer, cfg, steps: int, seed: int, out_dir: Path, device, render=None):
    """TRL's GRPOTrainer set up as our ``grpo`` with ``cfg``. ``render`` (prompt text -> text), when
    given, is applied to every prompt first (e.g. our chat-template rendering, so that TRL sees the
    same prompt ids as our env); the gold reward still gets the raw prompts."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    batch = cfg.num_prompts * cfg.group_size
    raw = {(render(p) if render else p): p for p in task.train_prompts}

    def gold(prompts, completions, **_):
        return task.gold_reward([raw.get(p, p) for p in prompts], list(completions))

    args = GRPOConfig(
        **_common_args(
            out_dir, seed, device, cfg.lr, steps * cfg.num_minibatches * cfg.num_iterations, cfg.max_grad_norm
        ),
        per_device_train_batch_size=batch // cfg.num_minibatches,
        steps_per_generation=cfg.num_minibatches,
        num_generations=cfg.group_size,
        num_iterations=cfg.num_iterations,
        beta=cfg.kl_coef,
        epsilon=cfg.clip_eps,
        loss_type="grpo",
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        max_completion_length=task.max_new_tokens,
        mask_truncated_completions=False,
    )
    data = Dataset.from_dict({"prompt": list(raw)})
    return GRPOTrainer(model=model, reward_funcs=gold, args=args, train_dataset=data, processing_class=tokenizer)


def dpo_trainer(
    task,
    model,
    ref,
    tokenizer,
    cfg,
    steps: int,
    seed: int,
    out_dir: Path,
    device,
    render=None,
    precompute_ref=False,
    generator: str = DEFAULT_GENERATOR,
):
    """TRL's DPOTrainer on the pairs our ``dpo`` draws (sampled by the same ``generator``). ``render``: as
    ``grpo_trainer``'s; ``precompute_ref``: TRL's ``precompute_ref_log_probs`` (reference log-probs once
    before training, as ours; TRL's default computes them every step)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = task.preference_pairs(ref, tokenizer, cfg.num_pairs, tau=cfg.annotator_tau, seed=seed, generator=generator)
    data = Dataset.from_dict(
        {
            "prompt": [render(p.prompt) if render else p.prompt for p in pairs],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs],
        }
    )
    args = DPOConfig(
        **_common_args(out_dir, seed, device, cfg.lr, steps, cfg.max_grad_norm),
        per_device_train_batch_size=cfg.batch_size,
        beta=cfg.beta,
        loss_type="sigmoid",
        **({"precompute_ref_log_probs": True} if precompute_ref else {}),
    )
    return DPOTrainer(
        model=model,
        ref_model=mask_positions(copy.deepcopy(ref)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )


def run_trl_cell(cell: Cell, out: Path, suite: Suite) -> dict[str, Any]:
    """Train TRL's trainer for the same iterations as our finished cell; evaluate like ours."""
    from rlhf_env import plugins
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.algorithms.run.loop import evaluate_policy
    from rlhf_env.tasks import get_task
    from rlhf_env.tasks.base_models import load_base_model

    ours = read_result(cell_dir(out, cell)) or {}
    path = trl_dir(out, cell)
    steps = ours.get(M.TIME_STEPS)
    base = {"task": cell.task.label, "algorithm": f"trl_{cell.algorithm}", "seed": cell.seed, M.TIME_STEPS: steps}
    try:
        import torch

        device = suite_device(suite.device)
        task = get_task(cell.task.name, **cell.task.knobs)
        ref, tok = load_base_model(task, cell.task.model, device=device, progress=False)
        cfg = plugins.get_host().algorithms.get(cell.algorithm).make_config(**cell.config)
        torch.manual_seed(cell.seed)
        model = mask_positions(copy.deepcopy(ref)).train()
        path.mkdir(parents=True, exist_ok=True)
        # Timed like our train_s: set-up (pairs, tokenisation) plus training. TRL's log lines go to a file.
        t0 = time.perf_counter()
        with open(path / "trl.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if cell.algorithm == "grpo":
                trainer = grpo_trainer(task, model, tok, cfg, steps, cell.seed, path, device)
            else:
                trainer = dpo_trainer(
                    task, model, ref, tok, cfg, steps, cell.seed, path, device, generator=suite.generator
                )
            trainer.train()
        train_s = time.perf_counter() - t0
        policy = trainer.model.eval()
        metrics = evaluate_policy(TrainContext(task, policy, ref, tok, device), suite.eval_prompts)
        # Ours beside TRL's under the same names: gold, KL and iterations per second of training time.
        ours_figures = {k: ours[k] for k in (M.REWARD_GOLD, M.OBJECTIVE_KL_EVAL)}
        ours_figures[M.PERF_STEPS_PER_S] = steps / ours[M.TIME_ELAPSED_S]
        result = {**base, "status": "ok", **metrics, M.TIME_ELAPSED_S: train_s, M.PERF_STEPS_PER_S: steps / train_s}
        result["ours"] = ours_figures
    except Exception as exc:  # recorded, like any failing cell
        result = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    _write_result(path, result)
    return result


def _compare(result: dict[str, Any]) -> str:
    gold, rate, ours = result[M.REWARD_GOLD], result[M.PERF_STEPS_PER_S], result["ours"]
    return (
        f"gold {gold:+.3f} (ours {ours[M.REWARD_GOLD]:+.3f}), {rate:.2f} steps/s (ours {ours[M.PERF_STEPS_PER_S]:.2f})"
    )


def run_trl_baseline(suite: Suite, out: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """TRL's GRPO and DPO for every finished ``grpo``/``dpo`` cell of the suite (skipping done ones)."""
    require_trl()
    import os

    import torch

    out = Path(out)
    cells = [
        c for c in suite.cells() if c.algorithm in ALGOS and (read_result(cell_dir(out, c)) or {}).get("status") == "ok"
    ]
    if not cells:
        raise TrainingStoppedError("--baseline trl compares with the suite's grpo and dpo cells; none of them finished")
    saved = torch.get_num_threads()
    # The same torch threads as one of the suite's workers, so steps/s compare like with like.
    torch.set_num_threads(suite.threads or max(1, (os.cpu_count() or 1) // max(suite.workers, 1)))
    results = []
    try:
        for i, cell in enumerate(cells):
            done = read_result(trl_dir(out, cell))
            if done and done.get("status") == "ok":
                results.append(done)
                continue
            if progress:
                print(f"  trl baseline {i + 1}/{len(cells)}: {cell.id}", flush=True)
            results.append(run_trl_cell(cell, out, suite))
            r = results[-1]
            if progress:
                print(f"    {r['status']}: " + (_compare(r) if r["status"] == "ok" else r["error"]))
    finally:
        torch.set_num_threads(saved)  # leave the caller's process as it was
    return results
