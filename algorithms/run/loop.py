"""One training loop for every algorithm: metrics, TensorBoard, checkpoints, resume.

Each iteration is a function of (weights, trainer state, step): the torch RNG and the
rollout seeds are derived from ``(seed, step)``, so a run resumed from a checkpoint
reproduces the metrics of an uninterrupted one. Records use the names of
``rlhf_env.algorithms.run.metrics`` (documented in docs/architecture.md), in ``metrics.jsonl`` and as
TensorBoard tags alike.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_env.algorithms.base import TrainContext
from rlhf_env.algorithms.run import memory
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.overrides import typed_overrides
from rlhf_env.algorithms.run.plumbing import NonFiniteLossError
from rlhf_env.algorithms.run.reward_choice import resolve_reward
from rlhf_env.algorithms.run.runfolder import (
    CHECKPOINT,
    RunFolderError,
    claim_run_folder,
    read_metrics,
    read_run_config,
    recover_checkpoint,
    write_checkpoint,
    write_text_atomic,
)
from rlhf_env.algorithms.scale import distributed, lora
from rlhf_env.algorithms.scale import fsdp as sharding
from rlhf_env.errors import SettingError, UserError
from rlhf_env.models import load_causal_lm, resolve_device, save_pretrained
from rlhf_env.rollout import EVAL_PROMPTS, EVAL_SEED, collect, sequence_kl
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.base_models import load_base_model


class TrainingError(UserError, RuntimeError):
    """Training stopped; the message names the step and where the last good checkpoint is."""


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31 - 1)


@torch.no_grad()
def evaluate_policy(ctx: TrainContext, n: int = EVAL_PROMPTS, seed: int = EVAL_SEED) -> dict[str, float]:
    """``reward/gold`` and ``objective/kl_eval`` of policy samples on the first ``n`` eval prompts
    (as ``rlhf_env.rollout.evaluate``), and ``reward/proxy`` of the same samples when ``ctx.reward`` is set."""
    prompts = ctx.task.eval_prompts[:n]
    env = ctx.env(len(prompts), split="eval")
    batch = collect(env, ctx.policy, seed, list(prompts), device=ctx.device, generator=ctx.generator)
    out = {M.REWARD_GOLD: float(batch.scores.mean()), M.OBJECTIVE_KL_EVAL: float(sequence_kl(batch).mean())}
    if ctx.reward is not None:
        out[M.REWARD_PROXY] = float(proxy_scores(ctx.reward, batch.prompts, batch.completions).mean())
    return out


def proxy_scores(reward, prompts: list[str], completions: list[str]):
    """(N,) the proxy reward of completions, checked as the env checks a reward's output."""
    from rlhf_env.rewards import as_scores, call_reward, reward_name

    return as_scores(call_reward(reward, prompts, completions), len(completions), reward_name(reward))


class ResumeError(UserError, ValueError):
    """A resumed run asked for settings other than the run's own; ``changes`` maps each key to (old, new)."""

    def __init__(self, out: Path, changes: dict[str, tuple[Any, Any]], fixed: str = ""):
        self.out, self.changes = out, changes
        diffs = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        if fixed:
            hint = f"the {fixed} of a run cannot change; start a new run (its checkpoint can be its --model)"
        else:
            hint = "drop those flags, override them (--override; recorded in config.json), or use another output folder"
        super().__init__(f"{out} holds a run with other settings: {diffs}; a resumed run keeps its settings: {hint}")


def _save_checkpoint(out: Path, ctx: TrainContext, trainer, step: int, resumes_from: int | None = None) -> None:
    if sharding.is_sharded(ctx.policy):  # FSDP: every rank writes its shards
        return sharding.save_checkpoint(out, ctx.policy, ctx.tokenizer, trainer, step, distributed.current().lead)
    if distributed.current() is not None and not distributed.current().lead:
        return  # data-parallel: rank 0 alone writes

    def save(folder: Path) -> None:
        (lora.save if lora.wrapper_of(ctx.policy) else save_pretrained)(ctx.policy, ctx.tokenizer, folder)
        torch.save({"step": step, "trainer": trainer.state_dict()}, folder / "trainer_state.pt")

    write_checkpoint(out, save, resumes_from)


def _resume_settings(out: Path, saved: dict, spec, now: dict[str, Any], overrides: dict[str, Any]):
    """The config a resumed run continues with (the saved one, then ``overrides``) and what differs.

    ``now``: the algorithm, task, task knobs, model and seed this call asks for.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    for key in ("algorithm", "task", "model", "seed", "reward"):
        # A run from before a key was saved: nothing to compare (it optimised the gold).
        old = saved.get(key, "gold" if key == "reward" else now[key])
        if key == "algorithm" and not (old and now[key]):
            continue  # an API call without a name
        if old != now[key]:
            changes[key] = (old, now[key])
    if "algorithm" in changes:  # the saved config is another algorithm's: nothing more to compare
        return {}, changes
    if saved.get("task") == now["task"]:
        old_knobs, new_knobs = saved.get("task_config") or {}, json.loads(json.dumps(now["task_config"], default=str))
        for knob in sorted(set(old_knobs) | set(new_knobs)):
            if old_knobs.get(knob) != new_knobs.get(knob):
                changes[f"task knob {knob}"] = (old_knobs.get(knob), new_knobs.get(knob))
    config = typed_overrides(spec.Config, saved.get("config") or {}, where=str(out / "config.json"))
    for key, new in overrides.items():
        if key in config and config[key] != new:
            changes[key] = (config[key], new)
    return {**config, **overrides}, changes


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
    override: bool = False,
    eval_every: int = 10,
    eval_points: int | None = None,
    eval_prompts: int = EVAL_PROMPTS,
    checkpoint_every: int = 10,
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    algo_name: str = "",
    reward: str | None = None,
    callback: Callable[[dict[str, float], float], None] | None = None,
    backend: str | None = None,
    lora_settings: lora.LoraSettings | None = None,
    fsdp: bool = False,
    measure_memory: bool = False,
) -> list[dict[str, float]]:
    """Train ``spec`` on ``task`` until a budget is spent; returns the metric records.

    Budgets (at least one; training stops at the first one reached): ``steps`` iterations,
    ``max_tokens`` training tokens (``perf/tokens``: completion tokens the updates are
    computed on, sampled online or read from pair/demonstration data), ``max_seconds`` of
    training time (``time/elapsed_s``: the trainer's set-up plus its steps; evaluation and
    checkpoints are not counted). Evaluation runs every ``eval_every`` steps, or, with
    ``eval_points=k``, each time another 1/k of the budget is spent, and at the end.
    ``callback(record, fraction_of_budget_spent)`` is called after every step. ``dtype``: the
    weights' dtype (default: as saved); log-probs are float32 whatever it is. ``reward``: what
    the run optimises (``rlhf_env.algorithms.run.reward_choice``: gold, a registered name, a reward model or
    ``reward_model`` run folder); the gold is evaluated either way.

    ``out`` is owned by this call (a lock). A folder that holds a run needs ``resume``: the
    run continues from its checkpoint with its saved algorithm, task, model, seed and config,
    ``config`` entries on top; anything that differs from the saved settings raises
    ``ResumeError``, unless ``override`` (the change is then recorded in ``config.json``).

    Started by ``torchrun`` (or with a ``backend``), the run is data-parallel over its ranks
    (``rlhf_env.algorithms.scale.distributed``): same update as one rank, rank 0 alone writes.
    ``lora_settings``: train LoRA adapters (``rlhf_env.algorithms.scale.lora``) instead of every weight.
    ``fsdp``: shard the policy over the ranks (``rlhf_env.algorithms.scale.fsdp``; sharded checkpoints).
    ``measure_memory``: the record of the second step (the first, in a one-step run) carries
    ``memory/peak_mb``, the peak tensor memory of the first two steps, and ``memory/estimate_mb``
    (``rlhf_env.algorithms.run.memory``).
    """
    budget = Budget(steps, max_tokens, max_seconds)
    overrides = typed_overrides(spec.Config, config or {})  # bad keys and types fail before any work
    first = spec.Config(**overrides) if not resume else None  # and so does an impossible config
    device = resolve_device(device)  # and a device this machine lacks
    dp = distributed.setup(device, backend, first)  # and a backend or world size that cannot work
    device, lead = (dp.device, dp.lead) if dp is not None else (device, True)
    choice = resolve_reward(reward, task, device=device)  # and a reward that cannot be used
    if fsdp and (dp is None or dp.world_size < 2 or lora_settings is not None):
        raise SettingError("--fsdp needs torchrun with 2 or more processes, and full fine-tuning (not --lora-rank)")
    with distributed.active(dp), claim_run_folder(out) if lead else distributed.follow(out) as out:
        if lead:
            recover_checkpoint(out)
        distributed.barrier()  # the other ranks read the folder once rank 0 has repaired it
        ckpt = out / CHECKPOINT
        metrics_file = out / "metrics.jsonl"
        has_checkpoint = (ckpt / "trainer_state.pt").exists()
        history = read_metrics(metrics_file)
        if not resume and (has_checkpoint or history):
            held = f"{len(history)} steps in metrics.jsonl" + (", a checkpoint" if has_checkpoint else "")
            raise RunFolderError(f"{out} already holds a run ({held}); resume it, or use another output folder")
        if resume and not has_checkpoint and any(r["step"] >= checkpoint_every for r in history):
            lost = f"{out}: metrics.jsonl has {len(history)} steps but there is no checkpoint to resume from"
            raise RunFolderError(f"{lost}; move metrics.jsonl away to start the run again")
        resuming = resume and has_checkpoint
        model = str(Path(model_path).expanduser().resolve()) if model_path is not None else None
        now = {"algorithm": algo_name, "task": task.name, "task_config": task.config, "model": model, "seed": seed}
        now["reward"] = choice.spec
        saved = read_run_config(out) if resuming else None
        changes: dict[str, tuple[Any, Any]] = {}
        if saved is not None:
            overrides, changes = _resume_settings(out, saved, spec, now, overrides)
            if "algorithm" in changes:
                raise ResumeError(out, changes, fixed="algorithm")
            if changes and not override:
                raise ResumeError(out, changes)
            if (saved.get("lora") or None) != (lora_settings.as_dict() if lora_settings else None):
                raise lora.LoraError(f"{out}: the LoRA settings of a run cannot change (it has {saved.get('lora')})")
            if saved.get("fsdp", False) != fsdp:
                raise SettingError(
                    f"{out}: a run's --fsdp cannot change (its checkpoint is {'' if fsdp else 'not '}sharded)"
                )
        cfg = spec.Config(**overrides)
        if dp is not None:
            distributed.check_batch(cfg, dp.world_size)
        ref, tokenizer = load_base_model(task, model_path, device=device, dtype=dtype)
        # New adapters (and anything else drawn while the models are built) come from the run's seed,
        # not from whatever this process drew before: the same in every run and on every rank.
        torch.manual_seed(seed)
        # The policy starts as the reference, or as the checkpoint's weights when resuming.
        if lora_settings is not None:  # adapters on the base; the reference is the base with them off
            policy = lora.attach(ref, lora_settings, ckpt if resuming else None).eval()
            ref = lora.reference(policy)
        elif fsdp:  # sharded; a resumed run loads its shards below
            policy = copy.deepcopy(ref).eval()
            sharding.shard(policy, dp)
        else:
            policy = load_causal_lm(ckpt, device=device, dtype=dtype) if resuming else copy.deepcopy(ref).eval()
        ctx = TrainContext(task, policy, ref, tokenizer, device, seed, reward=choice.fn)
        torch.manual_seed(seed)  # again: a trainer's own init (a value head) is the same with or without LoRA
        t0 = time.perf_counter()
        trainer = spec.Trainer(ctx, cfg)
        setup_s = time.perf_counter() - t0  # pair generation, reference log-probs, ...: part of the cost
        if fsdp:
            sharding.check_trainer(trainer)
            if not resuming:
                sharding.gather(policy)  # after the optimizer took the sharded parameters

        start, records = 0, []
        saved_step = None  # the step the folder resumes from, said when a later checkpoint write fails
        if resuming:
            try:
                state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=False)
            except (OSError, RuntimeError, EOFError, ValueError) as exc:
                raise RunFolderError(f"{ckpt / 'trainer_state.pt'}: cannot read the trainer state ({exc})") from exc
            if state.get("fsdp"):
                sharding.load_checkpoint(ckpt, policy, trainer)
            else:
                trainer.load_state_dict(state["trainer"])
            start = saved_step = state["step"]
            records = [r for r in history if r["step"] < start]
        if lead:
            write_text_atomic(metrics_file, "".join(json.dumps(r) + "\n" for r in records))
        saved = saved or {}
        log = list(saved.get("overrides", []))  # every accepted change of settings, with the step it came at
        if changes:
            log.append({"at_step": start, "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}})
        settings = {**now, "algorithm": algo_name or saved.get("algorithm", ""), "budget": budget.__dict__}
        settings.update({"config": cfg.__dict__, **({"overrides": log} if log else {})})
        if lora_settings is not None:
            settings["lora"] = lora_settings.as_dict()
        if fsdp:
            settings["fsdp"] = True
        if lead:
            write_text_atomic(out / "config.json", json.dumps(settings, indent=2, default=str))

        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=start) if lead else distributed.NullWriter()
        tokens_total = sum(r.get(M.PERF_TOKENS, 0) for r in records)
        elapsed = (records[-1][M.TIME_ELAPSED_S] if records else 0.0) + setup_s
        done = budget.fraction(start, tokens_total, elapsed) if records else 0.0
        bar = tqdm(
            total=100,
            desc=f"{algo_name or 'train'} on {task.name}",
            disable=not (progress and lead),
            initial=int(100 * done),
            unit="%",
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt}% [{elapsed}<{remaining}{postfix}]",
        )
        step = start
        meter = memory.PeakMeter(device) if measure_memory else None
        try:
            while done < 1.0:
                if meter is not None and step == start:
                    meter.start()
                t0 = time.perf_counter()
                torch.manual_seed(step_seed(seed, step))
                try:
                    # bf16 autocast on CUDA; log-probs are taken in float32 either way.
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        metrics = distributed.mean_metrics(dict(trainer.step(step, step_seed(seed, step))))
                    if fsdp:
                        sharding.gather(policy)  # rollouts and evaluation run without collectives
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
                before, done = done, distributed.from_lead(budget.fraction(step + 1, tokens_total, elapsed))
                if meter is not None and meter.running and (step > start or done >= 1.0):
                    metrics.update(_memory_metrics(meter, ctx, cfg, trainer))
                if eval_points:
                    due = done >= 1.0 or math.floor(done * eval_points) > math.floor(before * eval_points)
                else:
                    due = bool(eval_every) and ((step + 1) % eval_every == 0 or done >= 1.0)
                if due and lead:  # evaluation needs no other rank
                    metrics.update(evaluate_policy(ctx, eval_prompts))
                record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
                records.append(record)
                if lead:
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
                    _save_checkpoint(out, ctx, trainer, step, saved_step)
                    saved_step = step
        finally:
            if meter is not None and meter.running:  # an exception inside the window: close the profiler
                meter.stop()
            writer.close()
            bar.close()
        return records


def _memory_metrics(meter: memory.PeakMeter, ctx: TrainContext, cfg, trainer) -> dict[str, float]:
    """``memory/peak_mb`` of the window ``meter`` closes now and ``memory/estimate_mb`` (if the config is known)."""
    out = {M.MEMORY_PEAK_MB: meter.stop()}
    est = memory.estimate(ctx, cfg, trainer)
    if est is not None:
        out[M.MEMORY_ESTIMATE_MB] = est.mb
    return out


@dataclass(frozen=True)
class Budget:
    """When a run stops: after ``steps`` iterations, ``tokens`` training tokens or ``seconds`` of training time."""

    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None

    def __post_init__(self):
        given = {k: v for k, v in self.__dict__.items() if v is not None}
        if not given:
            raise SettingError("give a budget: steps, max_tokens or max_seconds")
        bad = {k: v for k, v in given.items() if not v > 0}
        if bad:
            raise SettingError(f"budget values must be > 0, got {bad}")

    def fraction(self, steps: int, tokens: float, seconds: float) -> float:
        """How much of the budget is spent (≥ 1: done): the largest of the three ratios."""
        parts = [(steps, self.steps), (tokens, self.tokens), (seconds, self.seconds)]
        return max(spent / limit for spent, limit in parts if limit is not None)
