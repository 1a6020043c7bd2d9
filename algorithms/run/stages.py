"""The stages a run goes through before its first step, each testable alone.

``check_launch`` (every setting that can fail without the folder), ``read_folder`` (what the run
folder holds), ``resumed_config`` (what a resumed run continues with, and what it may not change),
``build_models`` (reference, policy, trainer), ``restore`` (the checkpoint's trainer state) and
``run_settings`` (``config.json``). ``loop.train`` runs them in this order, then the step loop.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_env.algorithms.base import TrainContext
from rlhf_env.algorithms.run import precision
from rlhf_env.algorithms.run.overrides import typed_overrides
from rlhf_env.algorithms.run.reward_choice import resolve_reward
from rlhf_env.algorithms.run.runfolder import (
    CHECKPOINT,
    RunFolderError,
    read_metrics,
    read_run_config,
    recover_checkpoint,
)
from rlhf_env.algorithms.scale import distributed, lora
from rlhf_env.algorithms.scale import fsdp as sharding
from rlhf_env.errors import SettingError, UserError
from rlhf_env.generation import DEFAULT_GENERATOR
from rlhf_env.models import load_causal_lm, resolve_device
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.base_models import load_base_model

# The value a run saved before a key was recorded had (it optimised the gold, sampled with kv_cache).
UNSAVED_DEFAULTS = {"reward": "gold", "generator": DEFAULT_GENERATOR}


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


def _resume_settings(out: Path, saved: dict, spec, now: dict[str, Any], overrides: dict[str, Any]):
    """The config a resumed run continues with (the saved one, then ``overrides``) and what differs.

    ``now``: the algorithm, task, task knobs, model and seed this call asks for.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    for key in ("algorithm", "task", "model", "seed", "reward", "chat_template", "generator"):
        # A run from before a key was saved: its value then (UNSAVED_DEFAULTS), else nothing to compare.
        old = saved.get(key, UNSAVED_DEFAULTS.get(key, now[key]))
        if key == "algorithm" and not (old and now[key]):
            continue  # an API call without a name
        if old != now.get(key):
            changes[key] = (old, now.get(key))
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
    """What a run checked before touching its folder: the overrides, device, ranks, reward and generator."""

    overrides: dict[str, Any]
    device: torch.device
    dp: Any  # distributed.DataParallel or None
    lead: bool  # this process writes the run folder
    reward: Any  # reward_choice.RewardChoice
    generator: str = DEFAULT_GENERATOR  # a registered generator's name


def check_launch(
    spec, task: Task, config, resume: bool, device, backend, reward, lora_settings, fsdp: bool, generator=None
) -> Launch:
    """Every setting that can fail without the run folder fails here, before any work."""
    from rlhf_env import plugins

    generator = generator or DEFAULT_GENERATOR
    plugins.get_host().generators.get(generator)  # unknown names list the registered ones
    overrides = typed_overrides(spec.Config, config or {})  # bad keys and types
    first = spec.Config(**overrides) if not resume else None  # an impossible config
    device = resolve_device(device)  # a device this machine lacks
    dp = distributed.setup(device, backend, first)  # a backend or world size that cannot work
    device, lead = (dp.device, dp.lead) if dp is not None else (device, True)
    choice = resolve_reward(reward, task, device=device)  # a reward that cannot be used
    if fsdp and (dp is None or dp.world_size < 2 or lora_settings is not None):
        raise SettingError("--fsdp needs torchrun with 2 or more processes, and full fine-tuning (not --lora-rank)")
    return Launch(overrides, device, dp, lead, choice, generator)


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
    spec,
    task: Task,
    cfg,
    launch: Launch,
    folder: Folder,
    *,
    model_path,
    dtype,
    seed: int,
    lora_settings,
    fsdp: bool,
    chat_template: str = "auto",
) -> Models:
    """Load the reference, make the policy (a copy, LoRA adapters, FSDP shards or the checkpoint) and the trainer."""
    device, ckpt, resuming = launch.device, folder.checkpoint, folder.resuming
    # Mixed precision: float32 masters for what is trained; the frozen reference (and a LoRA base) in the low dtype.
    mixed, trained_dtype = precision.is_mixed(dtype), precision.weights_dtype(dtype)
    ref, tokenizer = load_base_model(
        task, model_path, device=device, dtype=dtype if lora_settings is not None else trained_dtype
    )
    # New adapters (and anything else drawn while the models are built) come from the run's seed,
    # not from whatever this process drew before: the same in every run and on every rank.
    torch.manual_seed(seed)
    # The policy starts as the reference, or as the checkpoint's weights when resuming.
    if lora_settings is not None:  # adapters on the base; the reference is the base with them off
        policy = lora.attach(ref, lora_settings, ckpt if resuming else None).eval()
        ref = lora.reference(policy)
        if mixed:
            precision.float32_trainable(policy)
    elif fsdp:  # sharded; a resumed run loads its shards in ``restore``
        policy = copy.deepcopy(ref).eval()
        sharding.shard(policy, launch.dp)
    else:
        policy = load_causal_lm(ckpt, device=device, dtype=trained_dtype) if resuming else copy.deepcopy(ref).eval()
    if mixed and lora_settings is None:
        ref = ref.to(dtype)  # a copy of its own by now: the policy was copied from it or loaded
    compute = dtype if mixed else None
    ctx = TrainContext(
        task,
        policy,
        ref,
        tokenizer,
        device,
        seed,
        generator=launch.generator,
        reward=launch.reward.fn,
        chat_template=chat_template,
        compute_dtype=compute,
    )
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
