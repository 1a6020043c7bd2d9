"""When a run stops and what follows a step: the ``Budget`` (steps, tokens, seconds) and the ``Schedule``
of evaluations and checkpoints over it, a stage of ``loop.train`` that is testable alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_env.errors import SettingError


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
