"""The fixed-shape observation and action spaces shared by both envs."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces


def observation_space(vocab_size: int, max_len: int) -> spaces.Dict:
    """``input_ids`` (L,) right-padded prompt ∘ completion; ``length`` and ``prompt_length``."""
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(max_len,), dtype=np.int64),
            "length": spaces.Discrete(max_len + 1),
            "prompt_length": spaces.Discrete(max_len + 1),
        }
    )


def action_space(vocab_size: int) -> spaces.Dict:
    """``token`` to append and the acting policy's ``logprob`` of it (needed when β > 0)."""
    return spaces.Dict(
        {
            "token": spaces.Discrete(vocab_size),
            "logprob": spaces.Box(np.finfo(np.float32).min, 0.0, shape=(), dtype=np.float32),
        }
    )
