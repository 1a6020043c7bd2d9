"""LoRA through PEFT: train low-rank adapters on the policy; the reference is the same base with them off.

``attach(base, settings)`` injects adapters (W x + (α/r)·B A x, B = 0 at the start, so the
policy starts as the base) into ``base`` in place and returns it, with only the adapters
trainable. ``reference(policy)`` is the same modules with the adapters disabled for each
forward: the base weights are held once. A run's checkpoint holds the adapters only
(``adapter_model.safetensors``); ``export(run, out)`` merges them into the base and saves
a plain checkpoint (``rlhf export-lora RUN OUT``).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rlhf_env.errors import MissingExtraError, UserError

ADAPTER_CONFIG = "adapter_config.json"


class LoraError(UserError, ValueError):
    """Bad LoRA settings, or a run/checkpoint without adapters."""


def require_peft() -> None:
    """PEFT, or a ``MissingExtraError`` that says which extra installs it."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            "LoRA (--lora-rank) needs PEFT, which is not installed: pip install 'rlhf_env[lora]'"
        ) from exc


@dataclass(frozen=True)
class LoraSettings:
    """rank r, scale α (the update is (α/r)·B A), dropout on the adapters' input, target module names
    (None: every linear layer but the output head, PEFT's ``all-linear``)."""

    rank: int
    alpha: float | None = None  # default 2r
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        require_peft()  # settings are made before any work: a missing install fails there
        if self.rank < 1:
            raise LoraError(f"--lora-rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise LoraError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise LoraError("--lora-target-modules names no module")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        targets = d.get("target_modules")
        return cls(d["rank"], d.get("alpha"), d.get("dropout", 0.0), tuple(targets) if targets else None)


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """Sorted distinct names (last component) of the model's linear layers, which LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def attach(base: torch.nn.Module, settings: LoraSettings, adapters: str | Path | None = None) -> torch.nn.Module:
    """``base`` with LoRA adapters injected in place (new ones, or those saved in the folder ``adapters``).

    Raises ``LoraError`` naming the target modules the model lacks, and the ones it has.
    """
    require_peft()
    from peft import LoraConfig, PeftModel, get_peft_model

    if settings.target_modules is not None:
        have = adaptable_modules(base)
        missing = [t for t in settings.target_modules if t not in have]
        if missing:
            raise LoraError(
                f"LoRA target modules {missing} are not in the model ({type(base).__name__}); "
                f"its linear layers are: {', '.join(have)}"
            )
    with warnings.catch_warnings():  # PEFT's notes on GPT-2's Conv1D layout and deprecated flags
        warnings.simplefilter("ignore")
        if adapters is not None:
            wrapper = PeftModel.from_pretrained(base, str(adapters), is_trainable=True)
        else:
            targets = list(settings.target_modules) if settings.target_modules else "all-linear"
            alpha = settings.alpha if settings.alpha is not None else 2 * settings.rank
            config = LoraConfig(
                r=settings.rank, lora_alpha=alpha, lora_dropout=settings.dropout, target_modules=targets
            )
            wrapper = get_peft_model(base, config)
    policy = wrapper.get_base_model()
    policy.__dict__["_lora_wrapper"] = wrapper  # not a submodule: found by ``wrapper_of``, never saved
    return policy


def wrapper_of(model: torch.nn.Module):
    """The ``PeftModel`` that ``attach`` put around ``model`` (None: no adapters)."""
    return model.__dict__.get("_lora_wrapper")


def reference(policy: torch.nn.Module) -> torch.nn.Module:
    """The base model: ``policy``'s own modules and weights, run with the adapters disabled."""
    wrapper = wrapper_of(policy)
    ref = copy.copy(policy)  # shares every submodule and parameter
    forward = type(policy).forward.__get__(ref)

    @functools.wraps(forward)  # keeps the signature (the KV cache argument is looked up in it)
    def base_forward(*args, **kwargs):
        with wrapper.disable_adapter():
            return forward(*args, **kwargs)

    ref.forward = base_forward
    ref.__dict__.pop("_lora_wrapper", None)
    return ref


def save(policy: torch.nn.Module, tokenizer, folder: Path) -> None:
    """The adapters (``adapter_model.safetensors``, ``adapter_config.json``) and the tokenizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper_of(policy).save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def run_settings(run: str | Path) -> dict:
    """The settings (``config.json``) of the LoRA run in ``run``; ``LoraError`` if it holds no such run."""
    from rlhf_env.algorithms.run.runfolder import CHECKPOINT, read_run_config

    run = Path(run)
    settings = read_run_config(run) if run.is_dir() else None
    if settings is None:
        raise LoraError(f"{run} holds no run (no config.json)")
    if not {"algorithm", "task"} <= settings.keys():  # e.g. a model folder: its config.json is the model's
        raise LoraError(
            f"{run} is not a run folder: its config.json names no algorithm and task (a model's config?); "
            "export-lora takes a folder written by rlhf train --lora-rank"
        )
    if not settings.get("lora") or not (run / CHECKPOINT / ADAPTER_CONFIG).exists():
        ckpt = run / CHECKPOINT
        raise LoraError(f"{run} is not a LoRA run: {ckpt} holds no {ADAPTER_CONFIG} (its weights need no merge)")
    return settings


def check_destination(run: str | Path, out: str | Path) -> None:
    """``out`` must be new or an empty folder, and not the run itself: nothing of a user's is overwritten."""
    run, out = Path(run), Path(out)
    if out.exists() and out.resolve() == run.resolve():
        raise LoraError(f"{out} is the run folder itself; export the merged model to a new or empty folder")
    if out.is_file():
        raise LoraError(f"{out} is a file; export the merged model to a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise LoraError(
            f"{out} is not empty; export the merged model to a new or empty folder (nothing is overwritten)"
        )


def export(run: str | Path, out: str | Path, task=None) -> Path:
    """Merge a LoRA run's adapters into its base model and save the result to ``out`` (a plain checkpoint).

    ``out`` must be new or an empty folder; the model is written beside it and renamed in, so an
    interrupted export leaves nothing half-written. ``task``: the run's task (default: built from its
    name and knobs in config.json).
    """
    from rlhf_env.algorithms.run.runfolder import CHECKPOINT
    from rlhf_env.models import save_pretrained
    from rlhf_env.tasks import task_from_spec
    from rlhf_env.tasks.base_models import load_base_model

    run, out = Path(run), Path(out)
    settings = run_settings(run)
    check_destination(run, out)
    task = task or task_from_spec(settings["task"], settings.get("task_config") or {})
    base, tokenizer = load_base_model(task, settings.get("model"), device="cpu")
    merged = wrapper_of(attach(base, LoraSettings.from_dict(settings["lora"]), run / CHECKPOINT)).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_pretrained(merged, tokenizer, tmp)
        os.replace(tmp, out)  # onto a missing or empty folder only: a folder filled meanwhile is an error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
