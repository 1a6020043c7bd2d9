"""Simulated annotators: Bradley-Terry preferences over a task's gold reward.

``p(a ≻ b) = σ((g(a) − g(b)) / τ)`` (docs/maths.md §11): τ → 0 is a perfect annotator, large τ a coin flip.
Pairs are two samples of a model (the base model) for the same prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rlhf_env.errors import SettingError, TrainingStoppedError
from rlhf_env.generation import DEFAULT_GENERATOR
from rlhf_env.progress import Progress
from rlhf_env.rollout import complete
from rlhf_env.tasks.pairs import PreferencePair, RewardFn


def preference_probability(gold_a: np.ndarray, gold_b: np.ndarray, tau: float) -> np.ndarray:
    """σ((g(a) − g(b)) / τ), elementwise."""
    if not tau > 0:
        raise SettingError(f"tau (the annotator temperature) must be > 0, got {tau}")
    z = (np.asarray(gold_a, dtype=np.float64) - np.asarray(gold_b, dtype=np.float64)) / tau
    return 0.5 * (1.0 + np.tanh(z / 2.0))  # = σ(z), without overflow


def label_pairs(
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    gold: RewardFn,
    tau: float,
    rng: np.random.Generator,
) -> list[PreferencePair]:
    """One simulated label per (prompt, a, b): a is chosen with probability σ((g(a) − g(b)) / τ)."""
    p = preference_probability(gold(prompts, completions_a), gold(prompts, completions_b), tau)
    a_wins = rng.random(len(p)) < p
    return [
        PreferencePair(x, a, b) if win else PreferencePair(x, b, a)
        for x, a, b, win in zip(prompts, completions_a, completions_b, a_wins)
    ]


def sample_preference_pairs(
    task,
    model,
    tokenizer,
    n: int,
    *,
    tau: float = 0.25,
    seed: int = 0,
    max_rounds: int = 8,
    chat_template: str = "auto",
    desc: str = "preference pairs",
    generator: str = DEFAULT_GENERATOR,
) -> list[PreferencePair]:
    """``n`` labelled pairs of two distinct samples of ``model`` on the task's train prompts.

    The samples come from the registered ``generator`` (``rlhf_env.generation``: the run's
    ``--generator``, a suite's ``generator``), at temperature 1. Pairs whose two samples are identical carry no preference and are drawn again, up
    to ``max_rounds`` times; fewer than ``n`` pairs after that is an error. The wait is
    shown on stderr (``rlhf_env.progress``, named ``desc``).
    """
    rng = np.random.default_rng(seed)
    pairs: list[PreferencePair] = []
    with Progress(n, desc, "pairs") as bar:
        for round_ in range(max_rounds):
            need = n - len(pairs)
            if need <= 0:
                break
            k = math.ceil(need * 1.5)
            prompts = [task.train_prompts[i] for i in rng.integers(len(task.train_prompts), size=k)]
            a, b = [
                _sampled(
                    bar,
                    len(pairs),
                    need,
                    half,
                    model,
                    tokenizer,
                    prompts,
                    task.max_new_tokens,
                    seed,
                    round_,
                    chat_template,
                    generator,
                )
                for half in (0, 1)
            ]
            keep = [i for i in range(k) if a[i] != b[i]]
            pairs += label_pairs(
                [prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep], task.gold_reward, tau, rng
            )[:need]
            bar.set(len(pairs))
    if len(pairs) < n:
        raise TrainingStoppedError(
            f"only {len(pairs)} of {n} pairs had two different samples; the model is too deterministic"
        )
    return pairs


def _sampled(
    bar, have, need, half, model, tokenizer, prompts, max_new_tokens: int, seed, round_, chat_template, generator
):
    """Sample ``half`` (0: a, 1: b) of a round's completions; ``bar`` moves with the model's forwards,
    one a token after the prompt's, over this half of the round's ``need`` pairs."""

    def moved(forwards: int) -> None:
        bar.set(have + need * (half + min(1.0, forwards / (max_new_tokens + 1))) / 2)

    with bar.forwards(model, moved):
        # prompts encoded as the env of the run encodes them
        seed = seed * 1000 + 2 * round_ + half
        return complete(
            model, tokenizer, prompts, max_new_tokens, seed=seed, chat_template=chat_template, generator=generator
        )
