"""One training loop for every algorithm: metrics, TensorBoard, checkpoints, resume.

Each iteration is a function of (weights, trainer state, step): the torch RNG and the
rollout seeds are derived from ``(seed, step)``, so a run resumed from a checkpoint
reproduces the metrics of an uninterrupted one. Records use the names of
``algorithms.metrics`` (documented in docs/architecture.md), in ``metrics.jsonl`` and as
TensorBoard tags alike.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from algorithms import metrics as M
from algorithms.base import TrainContext, collect_rollouts, sequence_kl
from algorithms.plumbing import NonFiniteLossError
from rlhf_env.models import default_device, load_causal_lm, save_pretrained
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.base_models import load_base_model

CHECKPOINT = "checkpoint"


class TrainingError(RuntimeError):
    """Training stopped; the message names the step and where the last good checkpoint is."""


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31 - 1)


@torch.no_grad()
def evaluate_policy(ctx: TrainContext, n: int = 64, seed: int = 12345) -> dict[str, float]:
    """``reward/gold`` and ``objective/kl_eval`` (Σ_t log π − log π_ref) of policy samples on the first ``n`` eval prompts."""
    prompts = ctx.task.eval_prompts[:n]
    env = ctx.env(len(prompts), split="eval")
    batch = collect_rollouts(ctx, env, seed, prompts=prompts)
    return {M.REWARD_GOLD: float(batch.scores.mean()), M.OBJECTIVE_KL_EVAL: float(sequence_kl(batch).mean())}


def _atomic_checkpoint(out: Path, ctx: TrainContext, trainer, step: int) -> None:
    """Write ``out/checkpoint`` via a temporary directory and a rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        save_pretrained(ctx.policy, ctx.tokenizer, tmp)
        torch.save({"step": step, "trainer": trainer.state_dict()}, tmp / "trainer_state.pt")
        old = out / CHECKPOINT
        if old.exists():
            trash = out / f".old-{os.getpid()}"
            os.replace(old, trash)
            os.replace(tmp, old)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(
    spec,
    task: Task,
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    max_tokens: int | None = None,
    max_seconds: float | None = None,
    seed: int = 0,
    model_path: str | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
    eval_every: int = 10,
    eval_points: int | None = None,
    eval_prompts: int = 64,
    checkpoint_every: int = 10,
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    algo_name: str = "",
    callback: Callable[[dict[str, float], float], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``spec`` on ``task`` until a budget is spent; returns the metric records.

    Budgets (at least one; training stops at the first one reached): ``steps`` iterations,
    ``max_tokens`` training tokens (``perf/tokens``: completion tokens the updates are
    computed on, sampled online or read from pair/demonstration data), ``max_seconds`` of
    training time (``time/elapsed_s``: the trainer's set-up plus its steps; evaluation and
    checkpoints are not counted). Evaluation runs every ``eval_every`` steps, or, with
    ``eval_points=k``, each time another 1/k of the budget is spent, and at the end.
    ``callback(record, fraction_of_budget_spent)`` is called after every step. ``dtype``: the
    weights' dtype (default: as saved); log-probs are float32 whatever it is.
    """
    budget = Budget(steps, max_tokens, max_seconds)
    cfg = spec.make_config(**(config or {}))  # bad config fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    ref, tokenizer = load_base_model(task, model_path, device=device, dtype=dtype)
    ckpt = out / CHECKPOINT
    resuming = resume and (ckpt / "trainer_state.pt").exists()
    # The policy starts as the reference, or as the checkpoint's weights when resuming.
    policy = load_causal_lm(ckpt, device=device, dtype=dtype) if resuming else copy.deepcopy(ref).eval()
    ctx = TrainContext(task, policy, ref, tokenizer, device, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trainer = spec.Trainer(ctx, cfg)
    setup_s = time.perf_counter() - t0  # pair generation, reference log-probs, ...: part of the cost

    start, records = 0, []
    metrics_file = out / "metrics.jsonl"
    if resuming:
        state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=False)
        trainer.load_state_dict(state["trainer"])
        start = state["step"]
        if metrics_file.exists():
            records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] < start]
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "config.json").write_text(json.dumps({"algorithm": algo_name, "task": task.name, "task_config": task.config,
                                                 "budget": budget.__dict__, "seed": seed, "config": cfg.__dict__},
                                                indent=2, default=str))  # fmt: skip

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=start)
    tokens_total = sum(r.get(M.PERF_TOKENS, 0) for r in records)
    elapsed = (records[-1][M.TIME_ELAPSED_S] if records else 0.0) + setup_s
    done = budget.fraction(start, tokens_total, elapsed) if records else 0.0
    bar = tqdm(total=100, desc=f"{algo_name or 'train'} on {task.name}", disable=not progress, initial=int(100 * done),
               unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt}% [{elapsed}<{remaining}{postfix}]")  # fmt: skip
    step = start
    try:
        while done < 1.0:
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(seed, step))
            try:
                # bf16 autocast on CUDA; log-probs are taken in float32 either way.
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    metrics = dict(trainer.step(step, step_seed(seed, step)))
            except NonFiniteLossError as exc:
                raise TrainingError(
                    f"step {step}: {exc}; training stopped, the last good checkpoint is kept in {out / CHECKPOINT}"
                ) from exc
            dt = time.perf_counter() - t0
            elapsed += dt
            tokens = metrics.get(M.PERF_TOKENS, 0)
            tokens_total += tokens
            metrics.update(
                {
                    M.PERF_TOKENS_PER_S: tokens / dt,
                    M.PERF_STEP_TIME_S: dt,
                    M.PERF_TOKENS_TOTAL: tokens_total,
                    M.TIME_ELAPSED_S: elapsed,
                }
            )
            before, done = done, budget.fraction(step + 1, tokens_total, elapsed)
            if eval_points:
                due = done >= 1.0 or math.floor(done * eval_points) > math.floor(before * eval_points)
            else:
                due = bool(eval_every) and ((step + 1) % eval_every == 0 or done >= 1.0)
            if due:
                metrics.update(evaluate_policy(ctx, eval_prompts))
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            records.append(record)
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and math.isfinite(value):
                    writer.add_scalar(key, value, step)
            bar.update(int(100 * min(done, 1.0)) - bar.n)
            shown = {k: f"{record[k]:.3f}" for k in (M.REWARD_SCORE, M.REWARD_GOLD) if k in record}
            bar.set_postfix(shown, refresh=False)
            if callback is not None:
                callback(record, min(done, 1.0))
            step += 1
            if step % checkpoint_every == 0 or done >= 1.0:
                _atomic_checkpoint(out, ctx, trainer, step)
    finally:
        writer.close()
        bar.close()
    return records


@dataclass(frozen=True)
class Budget:
    """When a run stops: after ``steps`` iterations, ``tokens`` training tokens or ``seconds`` of training time."""

    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        if not given:
            raise ValueError("give a budget: steps, max_tokens or max_seconds")
        bad = {k: v for k, v in given.items() if not v > 0}
        if bad:
            raise ValueError(f"budget values must be > 0, got {bad}")

    def fraction(self, steps: int, tokens: float, seconds: float) -> float:
        """How much of the budget is spent (≥ 1: done): the largest of the three ratios."""
        parts = [(steps, self.steps), (tokens, self.tokens), (seconds, self.seconds)]
        return max(spent / limit for spent, limit in parts if limit is not None)
