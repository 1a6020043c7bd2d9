"""``arithmetic_chat``: arithmetic asked in words, for a real instruct model (render it with its chat template).

Prompts like ``What is 7 + 5? Reply with just the number.``; the gold is ``final_number`` (the
completion's last number against the row's ``answer``), so a model that says ``The answer is 12.``
is right. Knobs: operand ``digits``, ``operators`` (a subset of ``+-*``), sizes and seed.
"""

from __future__ import annotations

import random

from rlhf_env.errors import SettingError
from rlhf_env.tasks.arithmetic import OPERATORS
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.fields import bind_fields
from rlhf_env.tasks.verifiers import final_number

TEMPLATE = "What is {a} {op} {b}? Reply with just the number."


def make_arithmetic_chat_task(
    digits: int = 2,
    operators: str = "+",
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    max_new_tokens: int = 24,
) -> Task:
    """Problems with ``digits``-digit operands asked in words; train and eval prompts are disjoint."""
    if digits < 1 or not operators or set(operators) - OPERATORS.keys():
        raise SettingError(
            f"digits must be >= 1 and operators a non-empty subset of '+-*', got {digits}, {operators!r}"
        )
    high = 10**digits
    universe = len(set(operators)) * high * high
    if n_train < 1 or n_eval < 1 or n_train + n_eval > universe:
        raise SettingError(
            f"n_train and n_eval must be >= 1 and together at most the {universe} distinct problems "
            f"with digits={digits}, operators={operators!r}"
        )
    rng = random.Random(seed)
    problems: set[tuple[int, str, int]] = set()
    while len(problems) < n_train + n_eval:
        problems.add((rng.randrange(high), rng.choice(operators), rng.randrange(high)))
    order = sorted(problems)
    rng.shuffle(order)
    fields = {TEMPLATE.format(a=a, op=op, b=b): {"answer": str(OPERATORS[op](a, b))} for a, op, b in order}
    prompts = list(fields)
    train, evaluation = prompts[:n_train], prompts[n_train:]
    return Task(
        name="arithmetic_chat",
        train_prompts=train,
        eval_prompts=evaluation,
        gold_reward=bind_fields(final_number(), fields, "arithmetic_chat"),
        sft_data=[(p, fields[p]["answer"]) for p in train],
        max_new_tokens=max_new_tokens,
        config={"digits": digits, "operators": operators, "n_train": n_train, "n_eval": n_eval, "seed": seed}
        | {"max_new_tokens": max_new_tokens},
        fields=fields,
    )
