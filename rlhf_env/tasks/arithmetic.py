"""``arithmetic``: prompts like ``37+48=``, a verifiable gold reward (the GRPO/R1 setting)."""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Sequence

from rlhf_env.errors import SettingError
from rlhf_env.tasks.base import BaseModelRecipe, Task, sized_recipe

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROMPT = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*$")
_INTEGER = re.compile(r"^-?\d+$")


def answer(prompt: str) -> str:
    """The correct answer of a prompt ``a<op>b=`` as a string."""
    m = _PROMPT.match(prompt)
    if not m:
        raise SettingError(f"not an arithmetic prompt: {prompt!r} (expected like '37+48=')")
    a, op, b = m.groups()
    return str(OPERATORS[op](int(a), int(b)))


def exact_match(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 if the completion (surrounding whitespace ignored) is exactly the answer, else 0.0."""
    return [float(c.strip() == answer(p)) for p, c in zip(prompts, completions)]


def partial_credit(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Share of answer digits right, aligned from the units; 0.0 for a malformed answer.

    Positions count over the longer of answer and completion, so extra digits cost
    credit, and a wrong sign halves it. Equals 1.0 exactly when ``exact_match`` does.
    """
    scores = []
    for p, c in zip(prompts, completions):
        want, got = answer(p), c.strip()
        if not _INTEGER.match(got):
            scores.append(0.0)
            continue
        w, g = want.lstrip("-")[::-1], got.lstrip("-")[::-1]
        right = sum(x == y for x, y in zip(w, g))
        score = right / max(len(w), len(g))
        if want.startswith("-") != got.startswith("-"):
            score /= 2
        scores.append(score)
    return scores


def make_arithmetic_task(
    digits: int = 2,
    operators: str = "+",
    n_train: int = 4000,
    n_eval: int = 200,
    seed: int = 0,
    sft_steps: int = 700,
    model_size: str = "tiny",
) -> Task:
    """Problems ``a<op>b=`` with ``digits``-digit operands; SFT data are the correct answers.

    Train and eval prompts are disjoint. ``sft_steps`` sets how far the base model is
    trained: few enough that it is right only part of the time. ``model_size``: ``tiny``
    (0.4M parameters, CPU) or ``gpu`` (~25M, ``rlhf_env.tasks.base.GPU_SHAPE``, the same
    steps at a third of the rate).
    """
    if digits < 1 or not operators or set(operators) - OPERATORS.keys():
        raise SettingError(
            f"digits must be >= 1 and operators a non-empty subset of '+-*', got {digits}, {operators!r}"
        )
    rng = random.Random(seed)
    high = 10**digits
    universe = len(operators) * high * high
    if n_train + n_eval > universe:
        raise SettingError(f"only {universe} distinct problems with digits={digits}, operators={operators!r}")
    seen: set[str] = set()
    while len(seen) < n_train + n_eval:
        seen.add(f"{rng.randrange(high)}{rng.choice(operators)}{rng.randrange(high)}=")
    prompts = sorted(seen)
    rng.shuffle(prompts)
    train, evaluation = prompts[:n_train], prompts[n_train:]
    return Task(
        name="arithmetic",
        train_prompts=train,
        eval_prompts=evaluation,
        gold_reward=exact_match,
        sft_data=[(p, answer(p)) for p in train],
        max_new_tokens=digits * 2 + 2,
        recipe=sized_recipe(
            BaseModelRecipe(
                n_layer=2, n_head=4, n_embd=128, sft_steps=sft_steps, batch_size=64, lr=3e-3, chars="0123456789+-*= "
            ),
            model_size,
            lr=1e-3,  # a third of the tiny model's rate; 233 steps at 6e-4 left it at 0.06 gold (CPU build)
        ),
        config={"digits": digits, "operators": operators, "n_train": n_train, "n_eval": n_eval, "seed": seed}
        | ({"model_size": model_size} if model_size != "tiny" else {}),  # tiny: the shipped models' keys
    )
