"""``prompt_file``: the user's own prompts (jsonl / json / csv / parquet) as a task.

``--task prompt_file:qa.jsonl,verifier=final_number`` (the path is the first knob). The file has a
``prompt`` column and any other fields, which rewards read by name (``rlhf_env.tasks.fields``):
``answer`` for the verifiers. The gold is ``verifier``: a registered reward (``final_number``,
``boxed``, ``math_verify``, ``exact_answer``, ...) or the user's own ``module:function`` /
``file.py:function``.

Train/eval split: a ``split`` column (``train``; ``eval``/``test``/``validation``) when the file has
one, else ``eval_fraction`` of the distinct prompts, drawn by ``seed`` (the same file and knobs give
the same split). SFT data (a tiny base model, the ``sft`` algorithm): the ``completion`` column,
else the ``answer`` column, else none (a real model is given with ``--model``).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from rlhf_env.errors import DataFileError, SettingError
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.data import load_records, where_row
from rlhf_env.tasks.fields import bind_fields, probe

EVAL_SPLITS = {"eval", "test", "validation"}


def make_prompt_file_task(
    path: str = "",
    verifier: str = "",
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_new_tokens: int = 128,
) -> Task:
    """A task of the prompts in ``path``, scored by ``verifier`` (see the module doc)."""
    if not path:
        raise SettingError("prompt_file needs the file: --task prompt_file:path/to/prompts.jsonl,verifier=NAME")
    if not verifier:
        raise SettingError(
            "prompt_file needs verifier=NAME, the gold reward: a registered reward "
            "(final_number, boxed, math_verify, exact_answer, ...) or your module:function"
        )
    if not 0 < eval_fraction < 1:
        raise SettingError(f"prompt_file: eval_fraction must be between 0 and 1, got {eval_fraction}")
    file = Path(path).expanduser().resolve()
    rows = load_records(file)
    fields = _fields_by_prompt(file, rows)
    train, evaluation = _split(file, rows, list(fields), eval_fraction, seed)
    gold = bind_fields(_verifier(verifier), fields, "prompt_file", where=f"verifier {verifier!r}")
    sft_column = next((c for c in ("completion", "answer") if all(c in f for f in fields.values())), None)
    sft = [(p, str(fields[p][sft_column])) for p in train] if sft_column else []
    config: dict[str, Any] = {"path": str(file), "verifier": verifier, "eval_fraction": eval_fraction, "seed": seed}
    # The file's content, so a resumed run refuses an edited file (``task knob sha256``).
    config.update(max_new_tokens=max_new_tokens, sha256=hashlib.sha256(file.read_bytes()).hexdigest()[:16])
    task = Task(
        name="prompt_file",
        train_prompts=train,
        eval_prompts=evaluation,
        gold_reward=gold,
        sft_data=sft,
        max_new_tokens=max_new_tokens,
        config=config,
        fields=fields,
        needs_sft_data=False,
    )
    if _is_users_code(verifier):
        probe(gold, train, f"verifier {verifier!r}")
    return task


def _fields_by_prompt(file: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``prompt -> its other fields``; a prompt twice with the same fields counts once, with other fields is refused."""
    fields: dict[str, dict[str, Any]] = {}
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        p = row["prompt"]
        mine = {k: v for k, v in row.items() if k != "prompt"}  # a split too: one prompt in both leaks
        if p in fields and fields[p] != mine:
            raise DataFileError(
                f"{file}: {where_row(file, i)}: prompt {p[:60]!r} is also at {where_row(file, first[p])} "
                "with other fields; a prompt's fields (its answer) must be one"
            )
        fields.setdefault(p, mine)
        first.setdefault(p, i)
    return {p: {k: v for k, v in f.items() if k != "split"} for p, f in fields.items()}


def _split(file: Path, rows, prompts: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, eval)`` prompts: by the ``split`` column, else a seeded held-out fraction."""
    if "split" in rows[0]:
        train, evaluation = [], []
        seen = set()
        for i, row in enumerate(rows):
            name = str(row["split"]).strip().lower()
            if name not in EVAL_SPLITS | {"train"}:
                raise DataFileError(
                    f"{file}: {where_row(file, i)}, column 'split': {row['split']!r}; expected train, eval, test or validation"
                )
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                (evaluation if name in EVAL_SPLITS else train).append(row["prompt"])
    else:
        if len(prompts) < 2:
            raise DataFileError(f"{file}: {len(prompts)} distinct prompt; a task needs 2 or more (train and eval)")
        order = list(prompts)
        random.Random(seed).shuffle(order)
        n_eval = min(len(order) - 1, max(1, round(eval_fraction * len(order))))
        evaluation, train = order[:n_eval], order[n_eval:]
    for what, part in (("train", train), ("eval", evaluation)):
        if not part:
            raise DataFileError(f"{file}: no {what} prompts (its split column names none)")
    return train, evaluation


def _is_users_code(verifier: str) -> bool:
    from rlhf_env import plugins
    from rlhf_env.user_code import is_code_ref

    return is_code_ref(verifier) and verifier.partition(":")[0] not in plugins.get_host().rewards


def _verifier(verifier: str):
    """The gold reward ``verifier`` names: a registered reward (no options) or the user's function."""
    from rlhf_env import plugins
    from rlhf_env.user_code import load_callable

    if _is_users_code(verifier):
        return load_callable(verifier, f"verifier {verifier!r}")
    registry = plugins.get_host().rewards
    if verifier not in registry:
        raise SettingError(
            f"prompt_file: unknown verifier {verifier!r}; a registered reward ({', '.join(sorted(registry.names()))}) "
            "or your module:function / path/to/file.py:function"
        )
    fn = registry.get(verifier)()
    fn.rlhf_name = verifier
    return fn
