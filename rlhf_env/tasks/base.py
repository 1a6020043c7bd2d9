"""What a task is: prompts, a gold reward we can measure exactly, SFT data, and a base model recipe."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rlhf_env.errors import SettingError
from rlhf_env.generation import DEFAULT_GENERATOR
from rlhf_env.tasks.pairs import PreferencePair, RewardFn


@dataclass(frozen=True)
class BaseModelRecipe:
    """How the project builds a task's base model: a tiny GPT-2 trained by SFT on the task's data.

    ``sft_steps`` is deliberately small so the base model is imperfect and RL has room to
    improve it. ``chars`` is the character tokenizer's alphabet (None: printable ASCII).
    """

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 128
    sft_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    chars: str | None = None


# GPU-sized base models (``model_size="gpu"``): 8 layers of width 512, ~25M parameters with a
# character vocabulary, the shape of the GPT-2 family's small end. Built on the GPU on first use
# (``build_base_model(device=...)``, which the bench passes its device to).
GPU_SHAPE = dict(n_layer=8, n_head=8, n_embd=512)
MODEL_SIZES = ("tiny", "gpu")


def sized_recipe(recipe: BaseModelRecipe, model_size: str, **gpu_training) -> BaseModelRecipe:
    """``recipe`` at a named size: ``tiny`` as given, ``gpu`` with ``GPU_SHAPE`` and ``gpu_training``
    (the SFT settings that suit the larger model, e.g. a lower ``lr``)."""
    if model_size not in MODEL_SIZES:
        raise SettingError(f"model_size must be one of {', '.join(MODEL_SIZES)}, got {model_size!r}")
    return recipe if model_size == "tiny" else replace(recipe, **GPU_SHAPE, **gpu_training)


@dataclass
class Task:
    """A task the algorithms are compared on.

    Attributes:
        name: registry name.
        train_prompts / eval_prompts: disjoint prompt lists.
        gold_reward: ``gold(prompts, completions) -> list[float]``, the measured truth.
        sft_data: ``(prompt, completion)`` pairs the base model is trained on.
        demonstrations: ``(prompt, completion)`` pairs of the behaviour the gold rewards, what
            SFT trains on (the human demonstrations of RLHF); ``sft_data`` when None, as in a
            task whose corpus is already the wanted behaviour (arithmetic's correct sums).
        max_new_tokens: completion length limit for rollouts on this task.
        recipe: how to build the base model.
        config: the knobs that made this task (part of the base model's cache key, but for ``unkeyed``).
        unkeyed: knobs of ``config`` that do not change the base model (the universal
            ``max_new_tokens`` of ``get_task``), left out of ``cache_key``.
        fields: per-prompt fields of the task's data (``prompt -> {column: value}``: a prompt
            file's ``answer``, a generated problem's entry), which rewards can read
            (``rlhf_env.tasks.fields``); None for a task without them.
    """

    name: str
    train_prompts: list[str]
    eval_prompts: list[str]
    gold_reward: RewardFn
    sft_data: list[tuple[str, str]]
    max_new_tokens: int = 16
    recipe: BaseModelRecipe = field(default_factory=BaseModelRecipe)
    config: dict[str, Any] = field(default_factory=dict)
    demonstrations: list[tuple[str, str]] | None = None
    unkeyed: tuple[str, ...] = ()
    fields: dict[str, dict[str, Any]] | None = None
    needs_sft_data: bool = True  # False: a task for given models (a prompt file without completions)
    # Multi-turn: ``interaction()`` makes what answers the policy's turns (``rlhf_env.interaction``);
    # the task's envs are then ``MultiTurnVectorEnv``s with these limits. None: single-turn.
    interaction: Callable[[], Any] | None = None
    max_turns: int = 8
    max_injection_tokens: int = 64
    # ``transcript_metrics(prompts, transcripts) -> {"call_rate": ..., "call_accuracy": ...}``: what the
    # evaluation reports of a tool task's episodes beside the gold (keys: metrics.TRANSCRIPT_METRICS)
    transcript_metrics: Callable[[list[str], list[str]], dict[str, float]] | None = None

    def env_options(self) -> dict[str, Any]:
        """The keyword arguments a multi-turn task adds to its envs ({} for a single-turn one)."""
        if self.interaction is None:
            return {}
        return {
            "interaction": self.interaction(),
            "max_turns": self.max_turns,
            "max_injection_tokens": self.max_injection_tokens,
        }

    def __post_init__(self):
        for what in ("train_prompts", "eval_prompts") + (("sft_data",) if self.needs_sft_data else ()):
            if not getattr(self, what):
                raise SettingError(f"task {self.name!r} has no {what}")

    def preference_pairs(
        self,
        model,
        tokenizer,
        n: int,
        *,
        tau: float = 0.25,
        seed: int = 0,
        chat_template: str = "auto",
        generator: str = DEFAULT_GENERATOR,
    ) -> list[PreferencePair]:
        """``n`` pairs of two samples of ``model`` labelled by a simulated Bradley-Terry annotator
        (sampled by the registered ``generator``, with prompts encoded as ``chat_template`` says,
        ``rlhf_env.prompt_format``)."""
        from rlhf_env.tasks.annotators import sample_preference_pairs

        return sample_preference_pairs(
            self, model, tokenizer, n, tau=tau, seed=seed, chat_template=chat_template, generator=generator
        )

    def cache_key(self) -> str:
        """A short hash of everything that determines the base model."""
        config = {k: v for k, v in self.config.items() if k not in self.unkeyed}
        blob = json.dumps({"task": self.name, "config": config, "recipe": asdict(self.recipe)}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


__all__ = ["MODEL_SIZES", "BaseModelRecipe", "PreferencePair", "RewardFn", "Task", "sized_recipe"]
