"""Run a suite: every cell its own training run (and TensorBoard run), in worker processes.

The jobs themselves (a task's base model, a cell) are ``rlhf_env.bench.cells``; this module is
the parent: which jobs are left, in which order, where they run, and what a crash leaves.
``results.csv``, ``results.md`` and the plots are written by ``rlhf_env.bench.report``.

A cell whose ``result.json`` says ``ok`` is skipped when the command runs again; an
interrupted cell resumes from its checkpoint; a failed cell is recorded with its error
(and traceback in ``error.txt``) and tried again on the next run. A worker process that
dies (out of memory, a crash in native code) fails the cells running at that moment; the
pool is rebuilt and the remaining cells go on. ``out`` is owned by one process at a time
(``rlhf_env.algorithms.run.runfolder``), and so is each cell's folder.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf_env import progress as waits
from rlhf_env.bench import fingerprint, pipeline
from rlhf_env.bench.cells import (
    _failed,
    _init_worker,
    _write_result,
    base_dir,
    cell_dir,
    prepare_task,
    read_result,
    run_cell,
    run_dir,
    suite_device,
)
from rlhf_env.bench.display import Display, summary
from rlhf_env.bench.suite import Cell, Suite

# The cells' folders and jobs, importable from here as before the split.
__all__ = ["base_dir", "cell_dir", "prepare_task", "read_result", "run_cell", "run_dir", "run_suite", "suite_device"]


# -- the parent -----------------------------------------------------------------------------


def run_suite(
    suite: Suite, out: str | os.PathLike, *, workers: int | None = None, progress: bool = True, executor=None
) -> list[dict]:
    """Run every unfinished cell of ``suite`` into ``out`` (owned by this call); returns the results of all cells.

    ``executor(jobs, display, workers, threads, out)`` runs the jobs (``rlhf_env.bench.executors``);
    default: this process (``workers`` 0) or a local process pool.
    """
    from rlhf_env.algorithms.run.runfolder import claim_run_folder

    suite_device(suite.device)  # a device this machine lacks fails here, not in every cell
    pipeline.check_rewards(suite)  # and so does a reward that cannot be used
    with claim_run_folder(out) as out:
        return _run_suite(suite, out, workers, progress, executor)


def _run_suite(suite: Suite, out: Path, workers: int | None, progress: bool, executor=None) -> list[dict]:
    workers = suite.workers if workers is None else workers
    cells = suite.cells()  # resolves "all" and fails early on unknown algorithm names
    (out / "suite.json").write_text(
        json.dumps(
            {
                "suite": suite.name,
                "path": str(suite.path),
                "cells": [c.id for c in cells],
                "tasks": [asdict(t) for t in suite.tasks],
            },
            indent=2,
        )
    )
    # A result is reused only if the suite still resolves to the settings it was made with.
    fingerprint.check_and_record(out, list(fingerprint.entries(suite, cells, out, cell_dir, base_dir)))
    base_jobs = [
        (f"{t.label}/base", prepare_task, (t, str(out), suite.device, suite.eval_prompts))
        for t in suite.tasks
        if (read_result(base_dir(out, t)) or {}).get("status") != "ok"
    ]
    todo = [c for c in cells if (read_result(cell_dir(out, c)) or {}).get("status") != "ok"]
    if len(todo) < len(cells):
        print(f"{suite.name}: {len(cells) - len(todo)} of {len(cells)} cells already finished in {out}, skipping them")
    rm_jobs, bon_jobs = pipeline.feedback_jobs(suite, out)
    display = Display(len(base_jobs) + len(rm_jobs) + len(bon_jobs) + len(todo), f"bench {suite.name}", progress)
    threads = suite.threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
    execute = executor or (_run_inline if workers == 0 else _run_pool)
    try:
        # Base models first (in parallel across tasks): every cell of a task starts from it.
        execute(base_jobs, display, workers, threads, out)
        args = (str(out), suite.device, suite.eval_points, suite.eval_prompts, suite.checkpoint_every, suite.generator)
        jobs = []
        for c in todo:
            base = read_result(base_dir(out, c.task)) or {"error": "not built"}
            if base.get("status") == "ok":
                jobs.append((c.id, run_cell, (c, *args)))
            else:
                _write_cell_result(cell_dir(out, c), _failed(c, f"the task's base model failed: {base['error']}"))
                display.finish(c.id, f"  FAILED {c.id}: the task's base model failed")
        # Then each learned-reward task's reward models (once per seed, shared by its cells), with the
        # cells that do not need one filling the workers; then the rest.
        first, then = pipeline.split_jobs(jobs, rm_jobs, bon_jobs)
        execute(first, display, workers, threads, out)
        execute(then, display, workers, threads, out)
    finally:
        display.close()
    return [_cell_result(out, c) for c in cells]


def _cell_result(out: Path, cell: Cell) -> dict[str, Any]:
    """The cell's ``result.json``; a cell whose folder another process holds is reported as skipped."""
    from rlhf_env.algorithms.run.runfolder import lock_holder

    path = cell_dir(out, cell)
    holder = lock_holder(path)
    if holder is not None:
        return _failed(cell, f"skipped: {path} is in use by {holder}; nothing was written into it")
    return read_result(path) or _failed(cell, "no result")


def _write_cell_result(path: Path, result: dict[str, Any]) -> None:
    """``result.json`` into a cell folder, unless another process holds it (then it is not ours to write)."""
    from rlhf_env.algorithms.run.runfolder import RunLockedError, claim_run_folder

    for _ in range(20):  # a worker that just died may still show as the holder for a moment (2 s at most)
        try:
            with claim_run_folder(path):
                return _write_result(path, result)
        except RunLockedError:
            time.sleep(0.1)
    # still held: ``_cell_result`` reports the cell as skipped


def _crashed(key: str, fn, args, out: Path, exc: BaseException) -> dict[str, Any]:
    """The result of a job that did not come back from its worker (the process died, or pickling failed)."""
    if isinstance(exc, BrokenProcessPool):
        error = "worker process died (out of memory or a native crash); the cells running beside it fail too"
    else:
        error = f"{type(exc).__name__}: {exc}"
    if fn is run_cell:
        result = _failed(args[0], error)
        _write_cell_result(cell_dir(out, args[0]), result)
        return result
    if fn is not prepare_task:  # a pipeline stage: its result stays unwritten, so the next run tries again
        return {"stage": key, "status": "failed", "task": key, "algorithm": "", "seed": args[1], "error": error}
    task = args[0]
    result = {"status": "failed", "task": task.label, "algorithm": "base", "error": error}
    _write_result(base_dir(out, task), result)
    return result


class _DirectQueue:
    """In-process stand-in for the workers' progress queue: updates the display at once."""

    def __init__(self, display: Display):
        self.display = display

    def put(self, item) -> None:
        self.display.update(*item)


def _run_inline(jobs, display: Display, workers: int, threads: int, out: Path) -> None:
    import torch

    saved = torch.get_num_threads()
    _init_worker(_DirectQueue(display), threads, inline=True)
    try:
        with waits.shown(False):  # the display is the one progress line
            for key, fn, args in jobs:
                display.start(key)
                display.finish(key, summary(fn(*args)))
    finally:
        _init_worker(None, saved, inline=True)


def _run_pool(jobs, display: Display, workers: int, threads: int, out: Path) -> None:
    if not jobs:
        return
    ctx = mp.get_context("spawn")  # no forked torch/OpenMP state
    q = ctx.Queue()
    pending = list(jobs)
    while pending:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q, threads))
        running: dict = {}
        broken = False
        try:
            while running or (pending and not broken):
                while pending and not broken and len(running) < workers:
                    job = pending.pop(0)
                    try:
                        running[pool.submit(job[1], *job[2])] = job
                    except BrokenProcessPool:
                        pending.insert(0, job)
                        broken = True
                        break
                    display.start(job[0])
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(q, display)
                for fut in finished:
                    key, fn, args = running.pop(fut)
                    exc = fut.exception()
                    # A dead worker breaks the pool: the jobs it ran fail, the rest go on in a new pool.
                    broken |= isinstance(exc, BrokenProcessPool)
                    display.finish(key, summary(fut.result() if exc is None else _crashed(key, fn, args, out, exc)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        _drain(q, display)


def _drain(q, display: Display) -> None:
    while True:
        try:
            key, fraction, gold = q.get_nowait()
        except (queue_mod.Empty, OSError, ValueError):
            return
        display.update(key, fraction, gold)
