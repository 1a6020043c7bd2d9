"""The data the annotators produce: preference pairs, and the reward signature they label with.

Its own module so that ``tasks.base`` (the ``Task``) and ``tasks.annotators`` (which labels
pairs for a task) both import it and not each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass(frozen=True)
class PreferencePair:
    """One labelled comparison: ``chosen`` was preferred to ``rejected`` for ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
