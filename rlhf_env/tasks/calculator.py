"""``calculator``: products the tiny model cannot do in its head, and a tool it may call.

Prompts are ``a*b=`` with a ``digits_a``-digit and a ``digits_b``-digit operand (default 3 × 2). The
policy may write a tool call ``[calc:EXPR]``; the env (``Calculator``, a multi-turn
``Interaction``) injects the result and ``;``, and the policy goes on, e.g. the transcript

    123*45=  [calc:123*45]5535;5535<eos>
             ^^^^^^^^^^^^^ policy    ^^^^ policy        (``5535;`` injected)

Bad calls are answered, never a crash: an expression that does not parse ``[calc:12*]`` gets
``err:malformed;``, another tool ``[sum:1]`` gets ``err:unknown tool;``, and with ``tool=False``
(the task without its tool, for what the tool is worth) every call gets ``err:no tools;``.

Gold (exact): the transcript with its tool segments ``[...]…;`` removed, stripped, equals the
product. The answer counts however it was found; the tool's own output never does (a copied
result is the policy's text after the ``;``).

The base model is the tiny GPT-2 by SFT on transcripts that mix correct tool use, wrong tool use
(a mistyped operand, then its result copied) and no tool use (a guess: the leading digits right,
the rest not), so it uses the format but often wrongly: RL has room.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from rlhf_env.errors import SettingError
from rlhf_env.interaction import Interaction, Reply
from rlhf_env.tasks.base import BaseModelRecipe, Task

CHARS = "0123456789+-*=[]:; abcdefghijklmnopqrstuvwxyz"
_PROMPT = re.compile(r"^(\d+)\*(\d+)=$")
_CALLS = re.compile(r"\[([a-z]*):([^\]]*)\]")  # [name:expr]
_EXPR = re.compile(r"^\s*(\d{1,6})\s*([+\-*])\s*(\d{1,6})\s*$")
_SEGMENT = re.compile(r"\[[^\]]*\][^;]*;")  # a call and what was injected after it
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def answer(prompt: str) -> str:
    m = _PROMPT.match(prompt)
    if not m:
        raise SettingError(f"not a calculator prompt: {prompt!r} (expected like '123*45=')")
    return str(int(m.group(1)) * int(m.group(2)))


def final_answer(transcript: str) -> str:
    """The policy's answer: the transcript without its tool segments, stripped."""
    return _SEGMENT.sub("", transcript).strip()


def exact_answer(prompts: Sequence[str], transcripts: Sequence[str]) -> list[float]:
    """1.0 where the final answer is exactly the product, else 0.0."""
    return [float(final_answer(t) == answer(p)) for p, t in zip(prompts, transcripts)]


def tool_use(prompts: Sequence[str], transcripts: Sequence[str]) -> dict[str, float]:
    """``call_rate``: share of episodes with a call; ``call_accuracy``: share of calls that are
    ``[calc:a*b]`` of the prompt's own operands (the right question, whatever the policy did after)."""
    episodes_with_call, calls, right = 0, 0, 0
    for p, t in zip(prompts, transcripts):
        a, b = _PROMPT.match(p).groups()
        asked = _CALLS.findall(t)
        episodes_with_call += bool(asked)
        calls += len(asked)
        right += sum(name == "calc" and expr.replace(" ", "") == f"{a}*{b}" for name, expr in asked)
    n = max(len(prompts), 1)
    return {"call_rate": episodes_with_call / n, "call_accuracy": right / calls if calls else 0.0}


class Calculator(Interaction):
    """Answers ``[calc:EXPR]`` with ``RESULT;`` (``tool=False``: with an error, as any other call)."""

    stop_strings = ("]",)
    timeout_s = 1.0

    def __init__(self, tool: bool = True):
        self.tool = tool

    def respond(self, state, turn: str) -> Reply:
        if not turn.endswith("]"):
            return Reply(done=True)  # the policy answered (EOS): the episode is over
        call = _CALLS.fullmatch(turn[turn.rfind("[") :])  # the call the turn ends with
        if call is None:
            return Reply("err:malformed;")
        name, expr = call.groups()
        if not self.tool:
            return Reply("err:no tools;")
        if name != "calc":
            return Reply("err:unknown tool;")
        m = _EXPR.match(expr)
        if m is None:
            return Reply("err:malformed;")
        a, op, b = m.groups()
        return Reply(f"{OPS[op](int(a), int(b))};")


def demonstration(prompt: str, rng: random.Random, mix: tuple[float, float, float]) -> str:
    """One SFT transcript: correct tool use, a mistyped call copied faithfully, or a head guess."""
    a, b = _PROMPT.match(prompt).groups()
    product = str(int(a) * int(b))
    kind = rng.choices(("tool", "typo", "guess"), weights=mix)[0]
    if kind == "tool":
        return f"[calc:{a}*{b}]{product};{product}"
    if kind == "typo":
        i = rng.randrange(len(a))
        a2 = a[:i] + str((int(a[i]) + rng.randrange(1, 10)) % 10) + a[i + 1 :]
        wrong = str(int(a2) * int(b))
        return f"[calc:{a2}*{b}]{wrong};{wrong}"
    keep = max(1, len(product) // 2)  # the leading digits a head estimate gets, the rest at random
    return product[:keep] + "".join(rng.choice("0123456789") for _ in product[keep:])


def make_calculator_task(
    digits_a: int = 3,
    digits_b: int = 2,
    n_train: int = 3000,
    n_eval: int = 200,
    seed: int = 0,
    tool: bool = True,
    mix: str = "0.45,0.25,0.3",
    sft_steps: int = 600,
) -> Task:
    """Products of a ``digits_a``- and a ``digits_b``-digit number with a calculator tool.

    ``tool=False``: the same task and base model, every call answered with an error (the tool's worth).
    ``mix``: the demonstrations' shares of correct tool use, mistyped calls and head guesses.
    """
    if not (1 <= digits_a <= 4 and 1 <= digits_b <= 4):
        raise SettingError(f"digits_a and digits_b must be in 1..4, got {digits_a}, {digits_b}")
    weights = tuple(float(x) for x in str(mix).split(","))
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise SettingError(f"mix must be three non-negative shares 'tool,typo,guess', got {mix!r}")
    rng = random.Random(seed)
    lo_a, lo_b = 10 ** (digits_a - 1), 10 ** (digits_b - 1)
    seen: set[str] = set()
    universe = 9 * lo_a * 9 * lo_b
    if n_train + n_eval > universe:
        raise SettingError(f"only {universe} distinct problems with {digits_a} and {digits_b} digits")
    while len(seen) < n_train + n_eval:
        seen.add(f"{rng.randrange(lo_a, 10 * lo_a)}*{rng.randrange(lo_b, 10 * lo_b)}=")
    prompts = sorted(seen)
    rng.shuffle(prompts)
    train, evaluation = prompts[:n_train], prompts[n_train:]
    demos = random.Random(seed + 1)
    longest = len(f"[calc:{'9' * digits_a}*{'9' * digits_b}]") + 2 * (digits_a + digits_b) + 1
    return Task(
        name="calculator",
        train_prompts=train,
        eval_prompts=evaluation,
        gold_reward=exact_answer,
        sft_data=[(p, demonstration(p, demos, weights)) for p in train],
        demonstrations=[(p, demonstration(p, demos, (1, 0, 0))) for p in train],
        max_new_tokens=longest + 18,  # a call, its result, the answer, and room for an error reply before it
        recipe=BaseModelRecipe(
            n_layer=2, n_head=4, n_embd=128, sft_steps=sft_steps, batch_size=64, lr=3e-3, chars=CHARS
        ),
        config={
            "digits_a": digits_a,
            "digits_b": digits_b,
            "n_train": n_train,
            "n_eval": n_eval,
            "seed": seed,
            "mix": mix,
            "tool": tool,
        },
        unkeyed=("tool",),  # the same base model with and without the tool
        interaction=lambda: Calculator(tool),
        transcript_metrics=tool_use,
        max_turns=3,
        max_injection_tokens=16,
    )
