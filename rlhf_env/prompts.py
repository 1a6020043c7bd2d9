"""Prompt sources and the embedded default prompt set."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_env.errors import SettingError

# A small set of openings written for this project: the default env's prompts.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The weather today is",
    "My favourite food is",
    "Yesterday I went to the",
    "The best thing about cats is",
    "A good friend always",
    "In the morning we",
    "The old house on the hill",
    "She opened the letter and",
    "The recipe needs three",
    "Our team won because",
    "The river was cold and",
    "He smiled when he saw the",
    "Every summer the village",
    "The little robot wanted to",
    "This book is about",
    "At night the city",
    "The garden is full of",
    "My brother likes to",
    "The train was late, so",
    "We need more green",
    "The teacher said that",
    "On the table there is a",
    "The music made everyone",
    "After the rain the sky",
)


class PromptSource:
    """Draws prompts uniformly from a fixed list, with the env's seeded generator."""

    def __init__(self, prompts: Sequence[str]):
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        prompts = list(prompts)
        if not prompts:
            raise SettingError("the prompt source is empty: give at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__}, not str: {p!r}")
        self.prompts = prompts

    def sample(self, rng: np.random.Generator) -> str:
        return self.prompts[int(rng.integers(len(self.prompts)))]

    def __len__(self) -> int:
        return len(self.prompts)
