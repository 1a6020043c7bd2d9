"""The embedded default: works offline with no arguments.

A tiny GPT-2-shaped model and character tokenizer built in code (random weights, fixed
seed), the embedded prompt set, and a simple programmatic reward (share of the letter
"e" in the completion). The same model serves as the reference.
"""

from __future__ import annotations

from typing import Any

from rlhf_env.env import TextGenEnv
from rlhf_env.prompts import DEFAULT_PROMPTS
from rlhf_env.rewards import letter_fraction
from rlhf_env.tiny import build_tiny_model
from rlhf_env.vector_env import VectorTextGenEnv


def default_parts(seed: int = 0) -> dict[str, Any]:
    model, tokenizer = build_tiny_model(seed=seed)
    return {"tokenizer": tokenizer, "ref_model": model, "reward": letter_fraction("e"), "prompts": DEFAULT_PROMPTS}


def _with_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    model_seed = kwargs.pop("model_seed", 0)
    if {"tokenizer", "ref_model"} <= kwargs.keys():  # the caller's model: only the reward and prompts are ours
        parts = {"reward": letter_fraction("e"), "prompts": DEFAULT_PROMPTS}
    else:
        parts = default_parts(model_seed)
    kwargs.setdefault("device", "cpu")  # the tiny model is fastest where it is
    return {**parts, **kwargs}


def make_default_env(**kwargs) -> TextGenEnv:
    """``TextGenEnv`` on the embedded default; any argument may be overridden."""
    return TextGenEnv(**_with_defaults(kwargs))


def make_default_vector_env(num_envs: int = 8, **kwargs) -> VectorTextGenEnv:
    """``VectorTextGenEnv`` on the embedded default (the id's ``vector_entry_point``)."""
    return VectorTextGenEnv(num_envs=num_envs, **_with_defaults(kwargs))
