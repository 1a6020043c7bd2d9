"""Verifiers: rewards that check a completion's final answer against the row's ``answer`` field.

Each registered factory (``rlhf_env.builtins``) returns ``reward(prompts, completions, answer)``:
the third parameter names the prompt file's column it reads (``rlhf_env.tasks.fields``), one value
per completion. Scores are 1.0 (right) or 0.0 (wrong, or no answer found).

- ``final_number``: the last number in the completion (``The answer is 1,234.`` -> 1234; thousands
  commas, ``$`` and a trailing period tolerated), compared numerically with the answer's last number
  (so a GSM8K answer ``... #### 72`` works as it is).
- ``boxed``: the content of the last ``\\boxed{...}`` (nested braces kept), equal to the answer as
  text (spaces and surrounding ``$`` ignored) or as a number.
- ``math_verify``: the ``math-verify`` package's ``parse``/``verify`` (mathematical equivalence:
  ``\\boxed{\\frac{1}{2}}`` equals ``0.5``); an optional dependency, extra ``reasoning``.
- ``exact_answer``: the whole completion (surrounding whitespace ignored) equals the answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rlhf_env.errors import MissingExtraError

# A number: optional sign, digits with thousands commas or plain digits, optional decimals.
# "1,234" is one number; "1,2" two (a comma not followed by three digits is punctuation).
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\d,]*\d)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_number(text: str) -> float | None:
    """The value of the last number in ``text`` (None when there is none).

    ``"The answer is 1,234."`` -> 1234.0; ``"$-5"`` and ``"-$5"`` -> -5.0; ``"x = 3.50"`` -> 3.5.
    """
    found = None
    for m in _NUMBER.finditer(text.replace("$-", "-$")):
        sign, whole, frac = m.groups()
        found = (-1 if sign else 1) * float(whole.replace(",", "") + (frac or ""))
    return found


def same_number(a: float | None, b: float | None) -> bool:
    """Equal up to float rounding (relative 1e-9), False when either is missing."""
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _number_of(value: Any) -> float | None:
    """An ``answer`` field as a number: a JSON/Parquet number, or the last number in its text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return last_number(str(value)) if value is not None else None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, nested braces kept; None when there is none
    (or its braces never close)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def answer_tag(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` (reasoning-gym's convention), stripped; None if absent."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", str(text)).strip("$")


def final_number():
    """Reward factory: 1.0 when the completion's last number equals the ``answer`` field's, else 0.0."""

    def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
        return [float(same_number(last_number(c), _number_of(a))) for c, a in zip(completions, answer)]

    return reward


def boxed():
    """Reward factory: 1.0 when the last ``\\boxed{...}`` equals the ``answer`` (as text or as a number)."""

    def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
        scores = []
        for c, a in zip(completions, answer):
            got = last_boxed(c)
            right = got is not None and (_normal(got) == _normal(a) or same_number(_plain_number(got), _number_of(a)))
            scores.append(float(right))
        return scores

    return reward


def _plain_number(text: str) -> float | None:
    """``text`` as a number only when it is one (``"1,234"``), not the last number inside an expression."""
    m = _NUMBER.fullmatch(_normal(text))
    return last_number(_normal(text)) if m else None


def exact_answer():
    """Reward factory: 1.0 when the completion, stripped, is the ``answer`` field (as text), else 0.0."""

    def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
        return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]

    return reward


def _math_verify_module():
    try:
        import math_verify
    except ImportError:
        raise MissingExtraError(
            "the math_verify reward needs the math-verify package: pip install 'rlhf_env[reasoning]'"
        ) from None
    return math_verify


def math_verify():
    """Reward factory: 1.0 when ``math_verify.verify`` finds the completion's answer equal to the ``answer``.

    The gold is parsed from the answer field as given (``"0.5"``, ``"$\\frac{1}{2}$"``); the
    completion's answer is what ``math_verify.parse`` extracts (a ``\\boxed{}``, the last expression).
    """
    mv = _math_verify_module()  # absent: refused when the reward is chosen, not at the first step

    def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any]) -> list[float]:
        scores = []
        for c, a in zip(completions, answer):
            gold, pred = mv.parse(str(a)), mv.parse(c)
            scores.append(float(bool(gold) and bool(pred) and mv.verify(gold, pred)))
        return scores

    return reward
