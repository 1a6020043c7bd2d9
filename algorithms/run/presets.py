"""Defaults for pretrained checkpoints: the settings a run on ``--model`` starts from.

The zoo's defaults are tuned on the project's tiny base models (0.1-0.4M parameters), where a
learning rate of 3e-4 is right. On a pretrained model the same rate wrecks the policy: four
GRPO steps on SmolLM2-135M moved it 3 nats from the reference, PPO 12, with every reward 0,
because Adam normalises even a noise gradient into a full step of size lr per weight
(docs/training.md, "Pretrained models"). So a Config declares ``PRETRAINED``, the values that
replace its defaults when the run trains a checkpoint the user gave (``model_path``) of 10M
parameters or more, and ``PRETRAINED_LORA`` for LoRA runs (adapters start at zero and need larger steps). A value
given explicitly (``--set``, a suite's config) always wins, a resumed run keeps what its
``config.json`` recorded, and the values applied are printed once and recorded in the run.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import fields
from typing import Any

# A checkpoint this large is a pretrained model, not one of the project's tiny ones (0.1-0.4M
# parameters): its Config's PRETRAINED values apply.
PRETRAINED_MIN_PARAMETERS = 10_000_000

# A policy further than this from its reference (objective/kl_eval, nats per completion) is
# far outside what KL-regularised RLHF means to explore: the loop warns once.
KL_WARNING_NATS = 10.0


def pretrained_defaults(config_cls: type, lora: bool) -> dict[str, Any]:
    """The values ``config_cls`` declares for pretrained models (``PRETRAINED``, then ``PRETRAINED_LORA``)."""
    names = {f.name for f in fields(config_cls)}
    values = dict(getattr(config_cls, "PRETRAINED", {}))
    if lora:
        values.update(getattr(config_cls, "PRETRAINED_LORA", {}))
    return {k: v for k, v in values.items() if k in names}


def apply(spec, config: dict[str, Any] | None, *, model_path, lora: bool, resume: bool, quiet: bool = False):
    """``config`` with the pretrained defaults under it, when ``model_path`` is given and not resuming.

    Returns the overrides the run starts from; prints the defaults applied (to stderr) unless ``quiet``.
    """
    config = dict(config or {})
    if model_path is None or resume or not is_pretrained(model_path):
        return config
    preset = {k: v for k, v in pretrained_defaults(spec.Config, lora).items() if k not in config}
    if preset and not quiet:
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in preset.items())
        print(
            f"rlhf_env: pretrained-model defaults for {spec.Config.__module__.rsplit('.', 1)[-1]}: {shown} "
            "(the zoo's defaults suit the tiny base models; --set KEY=VALUE to choose)",
            file=sys.stderr,
            flush=True,
        )
    return {**preset, **config}


def is_pretrained(model_path) -> bool:
    """Whether the checkpoint at ``model_path`` holds ``PRETRAINED_MIN_PARAMETERS`` or more parameters."""
    from rlhf_env.models import checkpoint_parameters

    return checkpoint_parameters(model_path) >= PRETRAINED_MIN_PARAMETERS


def kl_warning(kl_eval: float, step: int) -> str | None:
    """The warning for a policy ``kl_eval`` nats from its reference at ``step``, or None."""
    if not kl_eval > KL_WARNING_NATS:
        return None
    return (
        f"the policy is {kl_eval:.1f} nats from its reference at step {step + 1} (objective/kl_eval > "
        f"{KL_WARNING_NATS:g}): the learning rate is likely too high for this model (--set lr=...)"
    )


def warn_far_from_reference(kl_eval: float, step: int, warned: bool) -> bool:
    """Warn (``RunWarning``) once, the first time ``kl_warning`` has something to say; returns ``warned``."""
    from rlhf_env.errors import RunWarning

    message = None if warned else kl_warning(float(kl_eval), step)
    if message is not None:
        warnings.warn(RunWarning(message), stacklevel=2)
    return warned or message is not None
