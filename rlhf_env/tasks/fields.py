"""Rewards that read the task's per-prompt fields (a prompt file's ``answer``, a generated problem's entry).

The contract, decided once when a reward is chosen (``bind_fields``), never per call:

- a reward whose signature is ``reward(prompts, completions)`` is used as it is;
- every further named parameter is a field it reads: ``reward(prompts, completions, answer)`` gets
  ``answer=[...]``, the ``answer`` of each row's prompt, in the rows' order (as TRL's reward functions
  get dataset columns); a parameter with a default is passed only when the task has that field;
- ``**kwargs`` receives every field.

A reward that reads a field the task lacks is refused at once, naming the fields the task has. The
bound reward is a plain ``reward(prompts, completions)``, so the envs call it as any other. Rows are
found by their prompt text, which a task's fields are keyed by (a prompt file refuses one prompt
with two different sets of fields).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_env.errors import RewardError, SettingError


def reads_fields(reward) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """``(required, optional, all)``: the fields a reward's signature asks for beyond ``(prompts, completions)``."""
    if not callable(reward):
        return (), (), False
    try:
        params = list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the plain contract
        return (), (), False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = [p for p in params if p.kind in positional or p.kind is inspect.Parameter.KEYWORD_ONLY]
    rest = named[2:] if len([p for p in named if p.kind in positional]) >= 2 else []
    required = tuple(p.name for p in rest if p.default is inspect.Parameter.empty)
    optional = tuple(p.name for p in rest if p.default is not inspect.Parameter.empty)
    return required, optional, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class FieldReward:
    """``reward(prompts, completions)`` that calls ``inner(prompts, completions, **fields of those prompts)``."""

    def __init__(self, inner, fields: Mapping[str, Mapping[str, Any]], names: Sequence[str], task: str):
        self.func = inner  # ``rewards.reward_name`` names the user's function, not this wrapper
        self.fields, self.names, self.task = fields, tuple(names), task
        label = getattr(inner, "rlhf_name", None)
        if label:
            self.rlhf_name = label

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]):
        rows = []
        for p in prompts:
            row = self.fields.get(p)
            if row is None:
                raise RewardError(f"prompt {p[:60]!r} is not one of task {self.task!r}'s: no fields to score it with")
            rows.append(row)
        columns = {name: [row.get(name) for row in rows] for name in self.names}
        return self.func(prompts, completions, **columns)


def bind_fields(reward, fields: Mapping[str, Mapping[str, Any]] | None, task: str, where: str = "reward"):
    """``reward`` as a plain ``reward(prompts, completions)``, its fields bound to ``fields`` (see the module doc).

    ``fields``: ``prompt -> {field: value}`` (``Task.fields``), None for a task without fields.
    A reward that reads none is returned unchanged.
    """
    if isinstance(reward, FieldReward):
        reward = reward.func
    required, optional, wants_all = reads_fields(reward)
    if not required and not optional and not wants_all:
        return reward
    have = sorted({k for row in (fields or {}).values() for k in row})
    if required and not fields:
        raise SettingError(
            f"{where} reads the field(s) {', '.join(required)} of each prompt, but task {task!r} has no per-prompt "
            "fields; use it with a task that has them (a prompt file with those columns, arithmetic_chat, reasoning_gym)"
        )
    missing = [name for name in required if name not in have]
    if missing:
        raise SettingError(
            f"{where} reads the field(s) {', '.join(missing)}, which task {task!r} does not have; "
            f"its fields: {', '.join(have) or 'none'}"
        )
    names = have if wants_all else [*required, *[n for n in optional if n in have]]
    return FieldReward(reward, fields or {}, names, task)


def probe(reward, prompts: Sequence[str], where: str) -> None:
    """Call ``reward`` once on a few prompts (empty completions) so a wrong return fails when it is chosen.

    Meant for the user's own code (``--reward module:function``): the number and type of its
    scores are checked as every step checks them (``rewards.as_scores``).
    """
    from rlhf_env.rewards import as_scores, call_reward, reward_name

    sample = list(prompts[:2])
    try:
        as_scores(call_reward(reward, sample, [""] * len(sample)), len(sample), reward_name(reward))
    except RewardError as exc:
        raise SettingError(f"{where}: {exc} (checked on {len(sample)} of the task's prompts)") from None
