"""One training loop for every algorithm: metrics, TensorBoard, checkpoints, resume.

Each iteration is a function of (weights, trainer state, step): the torch RNG and the
rollout seeds are derived from ``(seed, step)``, so a run resumed from a checkpoint
reproduces the metrics of an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from algorithms.base import NonFiniteLossError, TrainContext, collect_rollouts, sequence_kl
from rlhf_env.models import default_device, load_causal_lm
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
    return {"reward/gold": float(batch.scores.mean()), "objective/kl_eval": float(sequence_kl(batch).mean())}


def _atomic_checkpoint(out: Path, ctx: TrainContext, trainer, step: int) -> None:
    """Write ``out/checkpoint`` via a temporary directory and a rename."""
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        ctx.policy.save_pretrained(tmp, safe_serialization=True)
        ctx.tokenizer.save_pretrained(tmp)
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
    steps: int,
    seed: int = 0,
    model_path: str | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
    eval_every: int = 10,
    eval_prompts: int = 64,
    checkpoint_every: int = 10,
    device=None,
    progress: bool = True,
    algo_name: str = "",
) -> list[dict[str, float]]:
    """Train ``spec`` on ``task`` for ``steps`` iterations; returns the metric records."""
    cfg = spec.make_config(**(config or {}))  # bad config fails before any work
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    ref, tokenizer = load_base_model(task, model_path, device=device)
    ckpt = out / CHECKPOINT
    resuming = resume and (ckpt / "trainer_state.pt").exists()
    # The policy starts as the reference, or as the checkpoint's weights when resuming.
    policy = load_causal_lm(ckpt, device=device) if resuming else copy.deepcopy(ref).eval()
    ctx = TrainContext(task, policy, ref, tokenizer, device, seed)
    torch.manual_seed(seed)
    trainer = spec.Trainer(ctx, cfg)

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
                                                 "steps": steps, "seed": seed, "config": cfg.__dict__}, indent=2, default=str))  # fmt: skip

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=start)
    tokens_total = sum(r.get("perf/tokens", 0) for r in records)
    elapsed = records[-1]["time/elapsed_s"] if records else 0.0
    bar = tqdm(range(start, steps), desc=f"{algo_name or 'train'} on {task.name}", disable=not progress,
               initial=start, total=steps)  # fmt: skip
    try:
        for step in bar:
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
            tokens_total += metrics.get("perf/tokens", 0)
            metrics.update({"perf/tokens_per_s": metrics.get("perf/tokens", 0) / dt, "perf/step_time_s": dt,
                            "perf/tokens_total": tokens_total, "time/elapsed_s": elapsed})  # fmt: skip
            last = step + 1 == steps
            if eval_every and ((step + 1) % eval_every == 0 or last):
                metrics.update(evaluate_policy(ctx, eval_prompts))
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            records.append(record)
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and math.isfinite(value):
                    writer.add_scalar(key, value, step)
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("reward/score", "reward/gold") if k in record}, refresh=False)
            if (step + 1) % checkpoint_every == 0 or last:
                _atomic_checkpoint(out, ctx, trainer, step + 1)
    finally:
        writer.close()
    return records
