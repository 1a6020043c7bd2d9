"""Run a suite: every cell its own training run (and TensorBoard run), in worker processes.

Layout of ``out``::

    runs/<task>/base/result.json              the reference model evaluated once per task
    runs/<task>/<algorithm>/seed<k>/          metrics.jsonl, tb/, checkpoint/, result.json
    results.csv, results.md, *.png            written by ``rlhf_env.bench.report``

A cell whose ``result.json`` says ``ok`` is skipped when the command runs again; an
interrupted cell resumes from its checkpoint; a failed cell is recorded with its error
(and traceback in ``error.txt``) and tried again on the next run. A worker process that
dies (out of memory, a crash in native code) fails the cells running at that moment; the
pool is rebuilt and the remaining cells go on. ``out`` is owned by one process at a time
(``rlhf_env.algorithms.run.runfolder``), and so is each cell's folder.

``result.json`` names its figures as ``metrics.jsonl`` does (``rlhf_env.algorithms.run.metrics``):
``reward/gold``, ``objective/kl_eval``, ``perf/tokens_total`` and ``time/elapsed_s`` are the
run's last record's; ``time/steps``, ``perf/mean_tokens_per_s``, ``time/wall_s`` and
``perf/peak_mem_mb`` are the runner's; ``memory/peak_mb`` and ``memory/estimate_mb`` (the
peak tensor memory of the first two steps and its analytic estimate, ``rlhf_env.algorithms.run.memory``)
are the run's. ``task``, ``algorithm``, ``seed``, ``budget``,
``status``, ``error`` and ``device`` say which cell it is and how it went.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf_env import progress as waits
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench import fingerprint, pipeline
from rlhf_env.bench.display import Display, summary
from rlhf_env.bench.suite import Cell, Suite, TaskEntry

_progress_queue = None  # set in each worker by _init_worker


def run_dir(out: Path, task_label: str, algorithm: str, seed: int) -> Path:
    return out / "runs" / task_label / algorithm / f"seed{seed}"


def cell_dir(out: Path, cell: Cell) -> Path:
    return run_dir(out, cell.task.label, cell.algorithm, cell.seed)


def base_dir(out: Path, task: TaskEntry) -> Path:
    return out / "runs" / task.label / "base"


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _write_result(path: Path, result: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path / "result.json")


# -- inside a worker ------------------------------------------------------------------------


def _init_worker(progress_queue, threads: int | None, inline: bool = False) -> None:
    """A worker's set-up: the parent's progress queue, torch threads; a worker process (not ``inline``) never
    shows its own progress (pair generation, SFT, ...): the parent's display is the one line the user sees."""
    global _progress_queue
    _progress_queue = progress_queue
    if not inline:
        waits.silence()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device) -> float:
    """Peak GPU memory allocated on CUDA; else the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not on Windows; there the figure is simply missing

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def suite_device(name: str):
    """The torch device a suite's ``device`` names (``auto``: CUDA if present); a missing one is an error."""
    from rlhf_env.models import resolve_device

    return resolve_device(None if name == "auto" else name)


def prepare_task(task: TaskEntry, out: str, device_name: str, eval_prompts: int) -> dict[str, Any]:
    """Build (or load) the task's base model and evaluate it: the starting point of every cell."""
    import copy

    t0 = time.perf_counter()
    try:
        from rlhf_env.algorithms.base import TrainContext
        from rlhf_env.algorithms.run.loop import evaluate_policy
        from rlhf_env.tasks import get_task
        from rlhf_env.tasks.base_models import load_base_model

        device = suite_device(device_name)
        t = get_task(task.name, **task.knobs)
        key = f"{task.label}/base"

        def report(step: int, steps: int) -> None:
            if _progress_queue is not None and (step % 10 == 0 or step == steps):
                _progress_queue.put((key, 0.95 * step / steps, None))  # the evaluation is the last 5 %

        ref, tok = load_base_model(t, task.model, device=device, progress=False, callback=report)
        ctx = TrainContext(t, copy.deepcopy(ref), ref, tok, device, chat_template=task.chat_template)
        metrics = evaluate_policy(ctx, eval_prompts)
        result = {
            "status": "ok",
            "task": task.label,
            "algorithm": "base",
            **metrics,
            M.MODEL_PARAMS: sum(p.numel() for p in ref.parameters()),
            M.TIME_WALL_S: time.perf_counter() - t0,
        }
    except Exception as exc:
        base_dir(Path(out), task).mkdir(parents=True, exist_ok=True)
        (base_dir(Path(out), task) / "error.txt").write_text(traceback.format_exc())
        result = {"status": "failed", "task": task.label, "algorithm": "base", "error": f"{type(exc).__name__}: {exc}"}
    _write_result(base_dir(Path(out), task), result)
    return result


def run_cell(
    cell: Cell,
    out: str,
    device_name: str,
    eval_points: int,
    eval_prompts: int,
    checkpoint_every: int,
    generator: str | None = None,
) -> dict[str, Any]:
    """Train one cell; never raises: a failure comes back as ``{"status": "failed", "error": ...}``.

    The cell's folder is held from start to end, so only its owner writes ``result.json`` and
    ``error.txt``; a folder another process holds is reported and left as it is.
    """
    from rlhf_env.algorithms.run.runfolder import RunLockedError, claim_run_folder

    path = cell_dir(Path(out), cell)
    try:
        with claim_run_folder(path):
            return _train_cell(cell, path, out, device_name, eval_points, eval_prompts, checkpoint_every, generator)
    except RunLockedError as exc:
        return _failed(cell, f"skipped: {exc}")


def _train_cell(
    cell, path: Path, out: str, device_name, eval_points, eval_prompts, checkpoint_every, generator
) -> dict:
    t0 = time.perf_counter()
    base = {"task": cell.task.label, "algorithm": cell.algorithm, "seed": cell.seed, "budget": cell.task.budget}
    try:
        from rlhf_env import plugins
        from rlhf_env.algorithms.run.loop import train
        from rlhf_env.tasks import get_task

        device = suite_device(device_name)
        spec = plugins.get_host().algorithms.get(cell.algorithm)
        task = get_task(cell.task.name, **cell.task.knobs)
        config, reward = pipeline.cell_inputs(cell, Path(out))  # a learned reward: the shared reward model
        _reset_peak_memory(device)

        def report(record: dict, fraction: float) -> None:
            if _progress_queue is not None:
                _progress_queue.put((cell.id, fraction, record.get(M.REWARD_GOLD)))

        records = train(
            spec,
            task,
            path,
            max_tokens=cell.task.budget.get("tokens"),
            max_seconds=cell.task.budget.get("seconds"),
            seed=cell.seed,
            model_path=cell.task.model,
            config=config,
            reward=reward,
            resume=True,
            eval_points=eval_points,
            eval_prompts=eval_prompts,
            checkpoint_every=checkpoint_every,
            device=device,
            progress=False,
            algo_name=cell.algorithm,
            callback=report,
            measure_memory=True,
            chat_template=cell.task.chat_template,
            generator=generator,
        )
        last = records[-1]
        # The first window's memory figures (a resumed cell measures again).
        memory = next((r for r in records if M.MEMORY_PEAK_MB in r), {})
        # The run's final figures, named as in metrics.jsonl; the last record carries an evaluation.
        names = (M.REWARD_GOLD, M.REWARD_GOLD_SE, M.REWARD_PROXY, M.OBJECTIVE_KL_EVAL, M.PERF_TOKENS_TOTAL)
        names += (M.TIME_ELAPSED_S,)
        result = {
            **base,
            "status": "ok",
            **{name: last[name] for name in names if name in last},
            M.TIME_STEPS: len(records),
            M.PERF_MEAN_TOKENS_PER_S: last[M.PERF_TOKENS_TOTAL] / last[M.TIME_ELAPSED_S],
            M.TIME_WALL_S: time.perf_counter() - t0,
            M.PERF_PEAK_MEM_MB: _peak_memory_mb(device),
            **{name: memory[name] for name in (M.MEMORY_PEAK_MB, M.MEMORY_ESTIMATE_MB) if name in memory},
            "device": str(device),
        }
        (path / "error.txt").unlink(missing_ok=True)
    except Exception as exc:  # a failing cell must not stop the suite
        (path / "error.txt").write_text(traceback.format_exc())
        error = f"{type(exc).__name__}: {exc}"
        changes = getattr(exc, "changes", None)  # a stages.ResumeError: the cell's settings are not its run's
        if isinstance(changes, dict):
            diffs = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            error = f"ResumeError: the suite changed since this cell started ({diffs}); remove {path} to run it again"
        result = {**base, "status": "failed", "error": error, M.TIME_WALL_S: time.perf_counter() - t0}
    _write_result(path, result)
    return result


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


def _failed(cell: Cell, error: str) -> dict[str, Any]:
    return {
        "task": cell.task.label,
        "algorithm": cell.algorithm,
        "seed": cell.seed,
        "budget": cell.task.budget,
        "status": "failed",
        "error": error,
    }


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
