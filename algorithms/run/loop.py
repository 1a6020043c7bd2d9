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


@dataclass
class Launch:
    """What a run checked before touching its folder: the overrides, device, ranks and reward."""

    overrides: dict[str, Any]
    device: torch.device
    dp: Any  # distributed.DataParallel or None
    lead: bool  # this process writes the run folder
    reward: Any  # reward_choice.RewardChoice


def check_launch(spec, task: Task, config, resume: bool, device, backend, reward, lora_settings, fsdp: bool) -> Launch:
    """Every setting that can fail without the run folder fails here, before any work."""
    overrides = typed_overrides(spec.Config, config or {})  # bad keys and types
    first = spec.Config(**overrides) if not resume else None  # an impossible config
    device = resolve_device(device)  # a device this machine lacks
    dp = distributed.setup(device, backend, first)  # a backend or world size that cannot work
    device, lead = (dp.device, dp.lead) if dp is not None else (device, True)
    choice = resolve_reward(reward, task, device=device)  # a reward that cannot be used
    if fsdp and (dp is None or dp.world_size < 2 or lora_settings is not None):
        raise SettingError("--fsdp needs torchrun with 2 or more processes, and full fine-tuning (not --lora-rank)")
    return Launch(overrides, device, dp, lead, choice)


@dataclass
class Folder:
    """What the run folder holds when the run starts."""

    out: Path
    history: list[dict[str, float]]  # metrics.jsonl as found
    resuming: bool  # a checkpoint to continue from

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"


def read_folder(out: Path, resume: bool, checkpoint_every: int, lead: bool) -> Folder:
    """Repair an interrupted checkpoint write (rank 0), then check the folder fits ``resume``."""
    if lead:
        recover_checkpoint(out)
    distributed.barrier()  # the other ranks read the folder once rank 0 has repaired it
    has_checkpoint = (out / CHECKPOINT / "trainer_state.pt").exists()
    history = read_metrics(out / "metrics.jsonl")
    if not resume and (has_checkpoint or history):
        held = f"{len(history)} steps in metrics.jsonl" + (", a checkpoint" if has_checkpoint else "")
        raise RunFolderError(f"{out} already holds a run ({held}); resume it, or use another output folder")
    if resume and not has_checkpoint and any(r["step"] >= checkpoint_every for r in history):
        lost = f"{out}: metrics.jsonl has {len(history)} steps but there is no checkpoint to resume from"
        raise RunFolderError(f"{lost}; move metrics.jsonl away to start the run again")
    return Folder(out, history, resume and has_checkpoint)


def resumed_config(
    folder: Folder, spec, now: dict[str, Any], launch: Launch, override: bool, lora_settings, fsdp: bool
):
    """``(overrides, changes, saved)``: the config a run continues with, what changed, the saved settings
    (``{}`` for a new run). A change is refused unless ``override``; the algorithm, LoRA and FSDP never change."""
    if not folder.resuming:
        return launch.overrides, {}, {}
    out, saved = folder.out, read_run_config(folder.out)
    if saved is None:  # no config.json: nothing to compare
        return launch.overrides, {}, {}
    overrides, changes = _resume_settings(out, saved, spec, now, launch.overrides)
    if "algorithm" in changes:
        raise ResumeError(out, changes, fixed="algorithm")
    if changes and not override:
        raise ResumeError(out, changes)
    if (saved.get("lora") or None) != (lora_settings.as_dict() if lora_settings else None):
        raise lora.LoraError(f"{out}: the LoRA settings of a run cannot change (it has {saved.get('lora')})")
    if saved.get("fsdp", False) != fsdp:
        raise SettingError(f"{out}: a run's --fsdp cannot change (its checkpoint is {'' if fsdp else 'not '}sharded)")
    return overrides, changes, saved


@dataclass
class Models:
    """The run's context (policy, reference, ...) and its trainer, with the trainer's set-up time."""

    ctx: TrainContext
    cfg: Any  # the algorithm's Config
    trainer: Any
    setup_s: float


def build_models(
    spec, task: Task, cfg, launch: Launch, folder: Folder, *, model_path, dtype, seed: int, lora_settings, fsdp: bool
) -> Models:
    """Load the reference, make the policy (a copy, LoRA adapters, FSDP shards or the checkpoint) and the trainer."""
    device, ckpt, resuming = launch.device, folder.checkpoint, folder.resuming
    ref, tokenizer = load_base_model(task, model_path, device=device, dtype=dtype)
    # New adapters (and anything else drawn while the models are built) come from the run's seed,
    # not from whatever this process drew before: the same in every run and on every rank.
    torch.manual_seed(seed)
    # The policy starts as the reference, or as the checkpoint's weights when resuming.
    if lora_settings is not None:  # adapters on the base; the reference is the base with them off
        policy = lora.attach(ref, lora_settings, ckpt if resuming else None).eval()
        ref = lora.reference(policy)
    elif fsdp:  # sharded; a resumed run loads its shards in ``restore``
        policy = copy.deepcopy(ref).eval()
        sharding.shard(policy, launch.dp)
    else:
        policy = load_causal_lm(ckpt, device=device, dtype=dtype) if resuming else copy.deepcopy(ref).eval()
    ctx = TrainContext(task, policy, ref, tokenizer, device, seed, reward=launch.reward.fn)
    torch.manual_seed(seed)  # again: a trainer's own init (a value head) is the same with or without LoRA
    t0 = time.perf_counter()
    trainer = spec.Trainer(ctx, cfg)
    setup_s = time.perf_counter() - t0  # pair generation, reference log-probs, ...: part of the cost
    if fsdp:
        sharding.check_trainer(trainer)
        if not resuming:
            sharding.gather(policy)  # after the optimizer took the sharded parameters
    return Models(ctx, cfg, trainer, setup_s)


def restore(models: Models, folder: Folder) -> tuple[int, list[dict[str, float]]]:
    """``(start step, records before it)``: the checkpoint's trainer state loaded, or ``(0, [])``."""
    if not folder.resuming:
        return 0, []
    path = folder.checkpoint / "trainer_state.pt"
    try:
        state = torch.load(path, map_location=models.ctx.device, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise RunFolderError(f"{path}: cannot read the trainer state ({exc})") from exc
    if state.get("fsdp"):
        sharding.load_checkpoint(folder.checkpoint, models.ctx.policy, models.trainer)
    else:
        models.trainer.load_state_dict(state["trainer"])
    start = state["step"]
    return start, [r for r in folder.history if r["step"] < start]


def run_settings(now, saved, algo_name, budget, cfg, changes, start, lora_settings, fsdp) -> dict[str, Any]:
    """``config.json``: who the run is, its budget and config, and every accepted change with its step."""
    log = list(saved.get("overrides", []))
    if changes:
        log.append({"at_step": start, "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}})
    settings = {**now, "algorithm": algo_name or saved.get("algorithm", ""), "budget": budget.__dict__}
    settings.update({"config": cfg.__dict__, **({"overrides": log} if log else {})})
    if lora_settings is not None:
        settings["lora"] = lora_settings.as_dict()
    if fsdp:
        settings["fsdp"] = True
    return settings


@dataclass(frozen=True)
class Schedule:
    """When a step is followed by an evaluation and a checkpoint, and when the run is done."""

    budget: Budget
    eval_every: int = 10
    eval_points: int | None = None
    checkpoint_every: int = 10

    def spent(self, steps: int, tokens: float, seconds: float) -> float:
        return self.budget.fraction(steps, tokens, seconds)

    def evaluates(self, step: int, before: float, done: float) -> bool:
        """Evaluate after ``step`` (which moved the spent fraction from ``before`` to ``done``)?"""
        if self.eval_points:
            return done >= 1.0 or math.floor(done * self.eval_points) > math.floor(before * self.eval_points)
        return bool(self.eval_every) and ((step + 1) % self.eval_every == 0 or done >= 1.0)

    def checkpoints(self, steps_done: int, done: float) -> bool:
        return steps_done % self.checkpoint_every == 0 or done >= 1.0


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
    """One trainer step with the torch RNG and the rollout seed of ``(seed, step)``: the step every caller
    (the loop, the bench's reward-model stage, ``peer_speed.py``) runs, so a step is the same wherever it runs."""
    torch.manual_seed(step_seed(seed, step))
    return trainer.step(step, step_seed(seed, step))


def timed_step(models: Models, step: int, seed: int, fsdp: bool, out: Path) -> tuple[dict[str, float], float]:
    """``(metrics averaged over the ranks, seconds)`` of one step; bf16 autocast on CUDA, log-probs float32 either way."""
    t0 = time.perf_counter()
    device = models.ctx.device
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            metrics = distributed.mean_metrics(dict(seeded_step(models.trainer, seed, step)))
        if fsdp:
            sharding.gather(models.ctx.policy)  # rollouts and evaluation run without collectives
    except NonFiniteLossError as exc:
        where = out / CHECKPOINT
        raise TrainingError(
            f"step {step}: {exc}; training stopped, the last good checkpoint is kept in {where}"
        ) from exc
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
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        records.append(record)
        sinks.write(record, done)
        step += 1
        if schedule.checkpoints(step, done):
            _save_checkpoint(folder.out, models.ctx, models.trainer, step, saved_step)
            saved_step = step
    return records


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

    The stages, each a function of this module: ``check_launch`` (settings, before any work),
    ``read_folder`` and ``resumed_config`` (the run folder), ``build_models``, ``restore``,
    ``run_settings`` (``config.json``), then ``run_steps`` with a ``Schedule`` and ``Sinks``.
    """
    budget = Budget(steps, max_tokens, max_seconds)
    launch = check_launch(spec, task, config, resume, device, backend, reward, lora_settings, fsdp)
    lead = launch.lead
    with distributed.active(launch.dp), claim_run_folder(out) if lead else distributed.follow(out) as out:
        folder = read_folder(out, resume, checkpoint_every, lead)
        model = str(Path(model_path).expanduser().resolve()) if model_path is not None else None
        now = {"algorithm": algo_name, "task": task.name, "task_config": task.config, "model": model, "seed": seed}
        now["reward"] = launch.reward.spec
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
            return run_steps(
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
        finally:
            if meter is not None and meter.running:  # an exception inside the window: close the profiler
                meter.stop()
            sinks.close()


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
