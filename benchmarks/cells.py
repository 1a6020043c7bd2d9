"""The work of ``rlhf bench`` inside a worker: a task's base model evaluated, a cell trained.

Each job runs in a worker process (or in the parent with ``workers = 0``, or as a Ray task),
never raises, and writes its ``result.json`` atomically; ``rlhf_env.bench.runner`` decides which
jobs run and where. Layout of ``out``::

    runs/<task>/base/result.json              the reference model evaluated once per task
    runs/<task>/<algorithm>/seed<k>/          metrics.jsonl, tb/, checkpoint/, result.json

A cell's ``result.json`` names its figures as ``metrics.jsonl`` does (``rlhf_env.algorithms.run.metrics``):
``reward/gold``, ``objective/kl_eval``, ``perf/tokens_total`` and ``time/elapsed_s`` are the
run's last record's; ``time/steps``, ``perf/mean_tokens_per_s``, ``time/wall_s`` and
``perf/peak_mem_mb`` are the runner's; ``memory/peak_mb`` and ``memory/estimate_mb`` (the
peak tensor memory of the first two steps and its analytic estimate, ``rlhf_env.algorithms.run.memory``)
are the run's. ``task``, ``algorithm``, ``seed``, ``budget``,
``status``, ``error`` and ``device`` say which cell it is and how it went.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from rlhf_env import progress as waits
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench import pipeline
from rlhf_env.bench.suite import Cell, TaskEntry

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
    base.update({"lora": cell.task.lora} if cell.task.lora else {})  # adapters trained, not every weight
    try:
        from rlhf_env import plugins
        from rlhf_env.algorithms.run.loop import train
        from rlhf_env.algorithms.scale.lora import LoraSettings
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
            # as rlhf train --lora-*: adapters on the base, and (a pretrained --model) the PRETRAINED_LORA presets
            lora_settings=LoraSettings.from_dict(cell.task.lora) if cell.task.lora else None,
        )
        last = records[-1]
        # The first window's memory figures (a resumed cell measures again).
        memory = next((r for r in records if M.MEMORY_PEAK_MB in r), {})
        # The run's final figures, named as in metrics.jsonl; the last record carries an evaluation.
        names = (M.REWARD_GOLD, M.REWARD_GOLD_SE, M.REWARD_PROXY, M.OBJECTIVE_KL_EVAL, M.PERF_TOKENS_TOTAL)
        names += (M.TIME_ELAPSED_S, M.EPISODE_TURNS, M.TOOL_CALL_RATE, M.TOOL_CALL_ACCURACY)  # the last: multi-turn
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


def _failed(cell: Cell, error: str) -> dict[str, Any]:
    return {
        "task": cell.task.label,
        "algorithm": cell.algorithm,
        "seed": cell.seed,
        "budget": cell.task.budget,
        "status": "failed",
        "error": error,
    }
