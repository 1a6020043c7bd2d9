"""What determines each bench result, stored beside it (``settings.json``), so a rerun reuses only what still holds.

A base model's evaluation, a reward model, a best-of-n baseline and a cell are each a function of
settings the suite resolves to (task, knobs, model, device, budget, hparams, pipeline keys, the
reward model a cell is trained against, ...). Before a rerun does any work, every folder that
already holds a finished result is compared with what the suite now says; one that
differs is refused with the keys that changed, rather than reused under the new settings' name
or silently thrown away. Results from before these records (no ``settings.json``) are reused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf_env.algorithms.run.runfolder import lock_holder
from rlhf_env.bench.pipeline import BON_ALGORITHM, RM_ALGORITHM, bon_dir, rm_dir
from rlhf_env.bench.suite import LEARNED, Cell, Suite, SuiteError, TaskEntry
from rlhf_env.generation import DEFAULT_GENERATOR

SETTINGS = "settings.json"
RM_KEYS = ("pairs", "tau", "rm_steps", "rm_lr", "rm_batch_size", "heldout_pairs")
BON_KEYS = ("best_of_n", "best_of_n_prompts")


class StaleResultsError(SuiteError):
    """Results in the output folder were made with settings the suite no longer has."""


def _task(suite: Suite, t: TaskEntry) -> dict[str, Any]:
    # chat_template only when not the default, so folders recorded before the key still match.
    template = {"chat_template": t.chat_template} if t.chat_template != "auto" else {}
    return {"task": t.name, "knobs": t.knobs, "model": t.model, "device": suite.device, **template}


def _generator(suite: Suite) -> dict[str, Any]:
    """The suite's generator, only when not the default: results from before the key stay reusable."""
    return {"generator": suite.generator} if suite.generator != DEFAULT_GENERATOR else {}


def rm_settings(suite: Suite, t: TaskEntry) -> dict[str, Any]:
    """A reward model's: its task, the pipeline keys that size it, and the generator its pairs are sampled by."""
    return {**_task(suite, t), "pipeline": {k: t.pipeline[k] for k in RM_KEYS}, **_generator(suite)}


def _reward(suite: Suite, t: TaskEntry) -> dict[str, Any]:
    """The reward a task's policies are trained (or best-of-n picks) against, a learned one by its settings."""
    return {"reward": t.reward, **({"reward_model": rm_settings(suite, t)} if t.reward == LEARNED else {})}


def cell_settings(suite: Suite, cell: Cell) -> dict[str, Any]:
    t = cell.task
    head = {**_task(suite, t), "algorithm": cell.algorithm, "seed": cell.seed, "budget": t.budget}
    evals = {"eval_points": suite.eval_points, "eval_prompts": suite.eval_prompts}
    lora = {"lora": t.lora} if t.lora else {}  # only when set: folders recorded before the key still match
    return {**head, "hparams": cell.config, **_reward(suite, t), **evals, **_generator(suite), **lora}


def entries(
    suite: Suite, cells: list[Cell], out: Path, cell_dir: Callable, base_dir: Callable
) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """``(name, folder, settings)`` of every result the suite makes in ``out``."""
    for t in suite.tasks:
        yield f"{t.label}/base", base_dir(out, t), {**_task(suite, t), "eval_prompts": suite.eval_prompts}
        for seed in suite.seeds:
            if t.reward == LEARNED:
                yield (
                    f"{t.rm_key}/{RM_ALGORITHM}/seed{seed}",
                    rm_dir(out, t, seed),
                    {**rm_settings(suite, t), "seed": seed},
                )
            if t.pipeline.get("best_of_n"):
                bon = {**_task(suite, t), **_reward(suite, t), "seed": seed, **{k: t.pipeline[k] for k in BON_KEYS}}
                bon.update(_generator(suite))
                yield f"{t.label}/{BON_ALGORITHM}/seed{seed}", bon_dir(out, t, seed), bon
    for c in cells:
        yield c.id, cell_dir(out, c), cell_settings(suite, c)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys (``hparams.lr``, ``reward_model.pipeline.rm_steps``), JSON-normalised."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changes(folder: Path, settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose recorded value differs from ``settings`` (none when nothing is recorded)."""
    try:
        old = json.loads((folder / SETTINGS).read_text())
    except (OSError, ValueError):
        return {}
    old, new = _flat(old), _flat(json.loads(json.dumps(settings)))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _finished(folder: Path) -> bool:
    """A finished result (an interrupted run whose settings changed fails itself: ``stages.ResumeError``)."""
    try:
        return json.loads((folder / "result.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def check_and_record(out: Path, found: list[tuple[str, Path, dict[str, Any]]]) -> None:
    """Refuse if any result in ``out`` was made with other settings; else record each one's settings."""
    stale = [(n, diff) for n, folder, settings in found if _finished(folder) and (diff := changes(folder, settings))]
    if stale:
        shown = "; ".join(
            f"{name} ({', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in diff.items())})" for name, diff in stale[:3]
        )
        more = f"; and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise StaleResultsError(
            f"{out}: {len(stale)} result(s) were made with other settings than the suite's: {shown}{more}; "
            "remove their folders to run them again with the new settings, or use another --out"
        )
    for _, folder, settings in found:
        if lock_holder(folder):  # another process's cell: never written into (the runner skips it too)
            continue
        if (folder / SETTINGS).exists() or not _finished(folder):  # not a result from before the records
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{SETTINGS}.tmp"
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
            os.replace(tmp, folder / SETTINGS)
