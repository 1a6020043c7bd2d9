"""One training loop for every algorithm: metrics, TensorBoard, checkpoints, resume.

Each iteration is a function of (weights, trainer state, step): the torch RNG and the
step's seed are independent streams derived from ``(seed, step)`` (``rlhf_env.seeding``), so a run resumed from a checkpoint
reproduces the metrics of an uninterrupted one. Records use the names of
``rlhf_env.algorithms.run.metrics`` (documented in docs/architecture.md), in ``metrics.jsonl`` and as
TensorBoard tags alike.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_env import progress as waits
from rlhf_env.algorithms.base import TrainContext
from rlhf_env.algorithms.run import memory, precision, presets
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import NonFiniteLossError
from rlhf_env.algorithms.run.runfolder import (
    CHECKPOINT,
    claim_run_folder,
    holds_checkpoint,
    write_checkpoint,
    write_text_atomic,
)
from rlhf_env.algorithms.run.schedule import Budget, Schedule
from rlhf_env.algorithms.run.stages import (
    Folder,
    Models,
    build_models,
    check_launch,
    read_folder,
    restore,
    resumed_config,
    run_settings,
)
from rlhf_env.algorithms.scale import distributed, lora
from rlhf_env.algorithms.scale import fsdp as sharding
from rlhf_env.errors import UserError
from rlhf_env.models import save_pretrained
from rlhf_env.prompt_format import check_chat_template_mode
from rlhf_env.rollout import EVAL_PROMPTS, EVAL_SEED, collect, sequence_kl
from rlhf_env.seeding import derive
from rlhf_env.tasks.base import Task


class TrainingError(UserError, RuntimeError):
    """Training stopped; the message names the step and where the last good checkpoint is."""


def step_seed(seed: int, step: int) -> int:
    """The seed ``trainer.step`` gets at ``step``; each of its consumers derives its own stream from it."""
    return derive(seed, "step", step)


@torch.no_grad()
def evaluate_policy(ctx: TrainContext, n: int = EVAL_PROMPTS, seed: int = EVAL_SEED) -> dict[str, float]:
    """``reward/gold`` and ``objective/kl_eval`` of policy samples on the first ``n`` eval prompts
    (as ``rlhf_env.rollout.evaluate``), and ``reward/proxy`` of the same samples when ``ctx.reward`` is set."""
    prompts = ctx.task.eval_prompts[:n]
    env = ctx.env(len(prompts), split="eval")
    T = ctx.task.max_new_tokens
    # Mixed precision: sampled as the training rollouts are (a plain run evaluates without autocast).
    low = getattr(ctx, "compute_dtype", None)
    with waits.Progress(T, f"evaluation ({len(prompts)} prompts)", "tokens") as bar:
        with (
            bar.forwards(ctx.policy, bar.set),
            torch.autocast(ctx.device.type, dtype=low or torch.bfloat16, enabled=low is not None),
        ):  # a policy forward a token
            batch = collect(env, ctx.policy, seed, list(prompts), device=ctx.device, generator=ctx.generator)
    gold = batch.scores
    se = float(gold.double().std() / math.sqrt(len(gold))) if len(gold) > 1 else 0.0  # the base's, in the report
    out = {
        M.REWARD_GOLD: float(gold.mean()),
        M.REWARD_GOLD_SE: se,
        M.OBJECTIVE_KL_EVAL: float(sequence_kl(batch).mean()),
    }
    if ctx.reward is not None:
        out[M.REWARD_PROXY] = float(proxy_scores(ctx.reward, batch.prompts, batch.completions).mean())
    if batch.turns is not None:  # a multi-turn task: its episodes' turns, and a tool task's tool use
        out[M.EPISODE_TURNS] = float(batch.turns.mean())
    if ctx.task.transcript_metrics is not None:
        for key, value in ctx.task.transcript_metrics(batch.prompts, batch.completions).items():
            out[M.TRANSCRIPT_METRICS[key]] = float(value)
    return out


def proxy_scores(reward, prompts: list[str], completions: list[str]):
    """(N,) the proxy reward of completions, checked as the env checks a reward's output."""
    from rlhf_env.rewards import as_scores, call_reward, reward_name

    return as_scores(call_reward(reward, prompts, completions), len(completions), reward_name(reward))


def _save_checkpoint(out: Path, ctx: TrainContext, trainer, step: int, resumes_from: int | None = None) -> None:
    if sharding.is_sharded(ctx.policy):  # FSDP: every rank writes its shards
        return sharding.save_checkpoint(out, ctx.policy, ctx.tokenizer, trainer, step, distributed.current().lead)
    if distributed.current() is not None and not distributed.current().lead:
        return  # data-parallel: rank 0 alone writes

    def save(folder: Path) -> None:
        (lora.save if lora.wrapper_of(ctx.policy) else save_pretrained)(ctx.policy, ctx.tokenizer, folder)
        torch.save({"step": step, "trainer": trainer.state_dict()}, folder / "trainer_state.pt")

    write_checkpoint(out, save, resumes_from)


class Sinks:
    """Where each record goes: ``metrics.jsonl`` and TensorBoard (rank 0), the progress bar, the callback."""

    def __init__(self, folder: Folder, lead: bool, start: int, done: float, desc: str, progress: bool, callback=None):
        from torch.utils.tensorboard import SummaryWriter

        self.metrics_file = folder.metrics_file if lead else None
        self.writer = SummaryWriter(str(folder.out / "tb"), purge_step=start) if lead else distributed.NullWriter()
        self.bar = tqdm(
            total=100,
            desc=desc,
            disable=not (progress and lead),
            initial=int(100 * done),
            unit="%",
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt}% [{elapsed}<{remaining}{postfix}]",
        )
        self.callback = callback

    def write(self, record: dict[str, float], done: float) -> None:
        if self.metrics_file is not None:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and math.isfinite(value):
                self.writer.add_scalar(key, value, record["step"])
        self.bar.update(int(100 * min(done, 1.0)) - self.bar.n)
        shown = {k: f"{record[k]:.3f}" for k in (M.REWARD_SCORE, M.REWARD_GOLD) if k in record}
        self.bar.set_postfix(shown, refresh=False)
        if self.callback is not None:
            self.callback(record, min(done, 1.0))

    def close(self) -> None:
        self.writer.close()
        self.bar.close()


def seeded_step(trainer, seed: int, step: int) -> dict[str, float]:
    """One trainer step with the torch RNG and the step seed of ``(seed, step)``, independent streams of the
    run's seed (``rlhf_env.seeding``): so a step is the same wherever it runs, resumed or not."""
    torch.manual_seed(derive(seed, "torch", step))  # global draws (dropout, a trainer's own) apart from the step's
    return trainer.step(step, step_seed(seed, step))


def timed_step(models: Models, step: int, seed: int, fsdp: bool, out: Path) -> tuple[dict[str, float], float]:
    """``(metrics averaged over the ranks, seconds)`` of one step; under autocast in the run's mixed-precision
    dtype, else bf16 on CUDA (``precision.autocast``); log-probs float32 either way."""
    t0 = time.perf_counter()
    device = models.ctx.device
    try:
        with precision.autocast(device, models.ctx.compute_dtype):
            metrics = distributed.mean_metrics(dict(seeded_step(models.trainer, seed, step)))
        if fsdp:
            sharding.gather(models.ctx.policy)  # rollouts and evaluation run without collectives
    except NonFiniteLossError as exc:
        kept = f"training stopped, the last good checkpoint is kept in {out / CHECKPOINT}"
        raise TrainingError(f"step {step}: {exc}; {kept}") from exc
    return metrics, time.perf_counter() - t0


def spent_at_start(models: Models, schedule: Schedule, start: int, records: list) -> tuple[float, float, float]:
    """``(training tokens, training seconds, fraction of the budget)`` spent before step ``start``."""
    tokens = sum(r.get(M.PERF_TOKENS, 0) for r in records)
    elapsed = (records[-1][M.TIME_ELAPSED_S] if records else 0.0) + models.setup_s
    return tokens, elapsed, schedule.spent(start, tokens, elapsed) if records else 0.0


def run_steps(
    models,
    schedule: Schedule,
    sinks: Sinks,
    folder: Folder,
    start: int,
    records: list,
    *,
    seed,
    lead,
    fsdp,
    eval_prompts,
    meter=None,
) -> list[dict[str, float]]:
    """Step until the budget is spent: each step's record (perf, evaluation, memory) goes to ``sinks``."""
    tokens_total, elapsed, done = spent_at_start(models, schedule, start, records)
    step, saved_step = start, (start if folder.resuming else None)  # said when a later checkpoint write fails
    warned = False
    while done < 1.0:
        if meter is not None and step == start:
            meter.start()
        metrics, dt = timed_step(models, step, seed, fsdp, folder.out)
        elapsed += dt
        tokens = metrics.get(M.PERF_TOKENS, 0)
        tokens_total += tokens
        metrics.update({M.PERF_TOKENS_PER_S: tokens / dt, M.PERF_STEP_TIME_S: dt})
        metrics.update({M.PERF_TOKENS_TOTAL: tokens_total, M.TIME_ELAPSED_S: elapsed})
        before, done = done, distributed.from_lead(schedule.spent(step + 1, tokens_total, elapsed))
        if meter is not None and meter.running and (step > start or done >= 1.0):
            metrics.update(_memory_metrics(meter, models.ctx, models.cfg, models.trainer))
        if schedule.evaluates(step, before, done) and lead:  # evaluation needs no other rank
            metrics.update(evaluate_policy(models.ctx, eval_prompts))
            warned = presets.warn_far_from_reference(metrics.get(M.OBJECTIVE_KL_EVAL, 0.0), step, warned)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        records.append(record)
        sinks.write(record, done)
        step += 1
        if schedule.checkpoints(step, done):
            _save_checkpoint(folder.out, models.ctx, models.trainer, step, saved_step)
            saved_step = step
    return records


def _recorded_model(model_path) -> str:
    """How config.json names the model: an absolute path, or a ``package:NAME`` reference as given."""
    from rlhf_env import gguf

    return model_path if gguf.is_package_ref(model_path) else str(Path(model_path).expanduser().resolve())


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
    chat_template: str = "auto",
    generator: str | None = None,
    on_end: Callable[[Models], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``spec`` on ``task`` until a budget is spent; returns the metric records.

    Budgets (at least one; training stops at the first one reached): ``steps`` iterations,
    ``max_tokens`` training tokens (``perf/tokens``: completion tokens the updates are
    computed on, sampled online or read from pair/demonstration data), ``max_seconds`` of
    training time (``time/elapsed_s``: the trainer's set-up plus its steps; evaluation and
    checkpoints are not counted). Evaluation runs every ``eval_every`` steps, or, with
    ``eval_points=k``, each time another 1/k of the budget is spent, and at the end.
    ``callback(record, fraction_of_budget_spent)`` is called after every step. ``dtype``: the
    weights' dtype (default: as saved); bfloat16 or float16 is mixed precision (``precision``:
    float32 policy weights and Adam state, low-dtype compute, the reference stored low); log-probs
    are float32 whatever it is. ``reward``: what
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
    ``generator``: the registered generator rollouts sample with (``rlhf_env.generation``; None:
    ``kv_cache``), part of the run's settings; data-parallel ranks sample with it too.
    ``measure_memory``: the record of the second step (the first, in a one-step run) carries
    ``memory/peak_mb``, the peak tensor memory of the first two steps, and ``memory/estimate_mb``
    (``rlhf_env.algorithms.run.memory``). ``chat_template``: ``"auto"`` (the tokenizer's chat template
    when it has one) or ``"none"`` (raw prompt text), for every env and offline encoding of the
    run (``TrainContext.chat_template``); saved in ``config.json``, so a resume keeps it.

    ``on_end(models)``: called on rank 0 with the trained ``Models`` (context, config, trainer) after the
    last step and its checkpoint, for what a caller takes from the trainer (the bench exports its reward
    model and pairs).

    The stages, each a function of this module: ``check_launch`` (settings, before any work),
    ``read_folder`` and ``resumed_config`` (the run folder), ``build_models``, ``restore``,
    ``run_settings`` (``config.json``), then ``run_steps`` with a ``Schedule`` and ``Sinks``.
    """
    budget = Budget(steps, max_tokens, max_seconds)
    check_chat_template_mode(chat_template)
    resuming, lora_run = resume and holds_checkpoint(out), lora_settings is not None  # a bench cell starts with resume
    config = presets.apply(spec, config, model_path=model_path, lora=lora_run, resume=resuming, quiet=not progress)
    launch = check_launch(spec, task, config, resume, device, backend, reward, lora_settings, fsdp, generator)
    lead = launch.lead
    # The waits before the first step (pairs, reference log-probs, a base-model build) and evaluations
    # show their progress on rank 0 when ``progress`` (``rlhf_env.progress``).
    with waits.shown(progress and lead), distributed.active(launch.dp), _folder(out, lead) as out:
        folder = read_folder(out, resume, checkpoint_every, lead)
        model = None if model_path is None else _recorded_model(model_path)
        now = {"algorithm": algo_name, "task": task.name, "task_config": task.config, "model": model, "seed": seed}
        now.update(reward=launch.reward.spec, generator=launch.generator, chat_template=chat_template)
        overrides, changes, saved = resumed_config(folder, spec, now, launch, override, lora_settings, fsdp)
        cfg = spec.Config(**overrides)
        if launch.dp is not None:
            distributed.check_batch(cfg, launch.dp.world_size)
        models = build_models(
            spec,
            task,
            cfg,
            launch,
            folder,
            model_path=model_path,
            dtype=dtype,
            seed=seed,
            lora_settings=lora_settings,
            fsdp=fsdp,
            chat_template=chat_template,
        )
        start, records = restore(models, folder)
        settings = run_settings(now, saved, algo_name, budget, cfg, changes, start, lora_settings, fsdp)
        if lead:
            write_text_atomic(folder.metrics_file, "".join(json.dumps(r) + "\n" for r in records))
            write_text_atomic(out / "config.json", json.dumps(settings, indent=2, default=str))
        schedule = Schedule(budget, eval_every, eval_points, checkpoint_every)
        done = spent_at_start(models, schedule, start, records)[2]
        sinks = Sinks(folder, lead, start, done, f"{algo_name or 'train'} on {task.name}", progress, callback)
        meter = memory.PeakMeter(launch.device) if measure_memory else None
        try:
            records = run_steps(
                models,
                schedule,
                sinks,
                folder,
                start,
                records,
                seed=seed,
                lead=lead,
                fsdp=fsdp,
                eval_prompts=eval_prompts,
                meter=meter,
            )
            if on_end is not None and lead:
                on_end(models)
            return records
        finally:
            if meter is not None and meter.running:  # an exception inside the window: close the profiler
                meter.stop()
            sinks.close()


def _folder(out, lead: bool):
    """The run folder: claimed by rank 0, read by the others."""
    return claim_run_folder(out) if lead else distributed.follow(out)


def _memory_metrics(meter: memory.PeakMeter, ctx: TrainContext, cfg, trainer) -> dict[str, float]:
    """``memory/peak_mb`` of the window ``meter`` closes now and ``memory/estimate_mb`` (if the config is known)."""
    out = {M.MEMORY_PEAK_MB: meter.stop()}
    est = memory.estimate(ctx, cfg, trainer)
    if est is not None:
        out[M.MEMORY_ESTIMATE_MB] = est.mb
    return out
