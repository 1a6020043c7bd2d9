"""The RLHF pipeline of ``rlhf bench``: preferences -> one reward model -> policies, gold measured.

For a task whose suite ``reward`` is ``learned``, per seed (once, before its cells):

1. sample ``pairs`` pairs of two base-model completions on the train prompts and label them with
   the simulated annotators (Bradley-Terry on the gold, temperature ``tau``): the feedback budget;
2. train one Bradley-Terry reward model r_φ on them (``rlhf_env.algorithms.zoo.reward_model``, through the
   training loop's stages: its run folder is ``run/``) and measure its held-out pair accuracy against fresh
   annotator labels and against the gold order.

Layout: ``out/reward_models/<task>-N<pairs>-tau<tau>/seed<k>/`` holds ``pairs.jsonl``, ``model/``
(r_φ as a Hugging Face sequence classifier), ``run/`` (the training run) and ``result.json``; task entries that differ only
in β share it. Every cell of the task then gets the same inputs (``cell_inputs``): online
algorithms optimise r_φ (the env's KL-shaped reward; ``reward/proxy`` beside ``reward/gold``),
offline pair algorithms (DPO family, KTO) read the same ``pairs.jsonl``, SFT learns from the
demonstrations. ``best_of_n`` > 0 adds the best-of-n baseline (``rlhf_env.bench.best_of_n``) against
the task's optimised reward, in ``out/runs/<task>/best_of_n/seed<k>/``, for any task.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench.suite import GOLD, LEARNED, Cell, Suite, SuiteError, TaskEntry
from rlhf_env.errors import TrainingStoppedError
from rlhf_env.generation import DEFAULT_GENERATOR

RM_ALGORITHM, BON_ALGORITHM = "reward_model", "best_of_n"


def rm_dir(out: Path, task: TaskEntry, seed: int) -> Path:
    return out / "reward_models" / task.rm_key / f"seed{seed}"


def bon_dir(out: Path, task: TaskEntry, seed: int) -> Path:
    return out / "runs" / task.label / BON_ALGORITHM / f"seed{seed}"


def check_rewards(suite: Suite) -> None:
    """Every task's reward that is neither gold nor learned resolves (``rlhf train --reward``), before any work."""
    from rlhf_env.algorithms.run.reward_choice import RewardChoiceError, resolve_reward
    from rlhf_env.tasks import get_task

    for t in suite.tasks:
        if t.reward not in (GOLD, LEARNED):
            try:
                resolve_reward(t.reward, get_task(t.name, **t.knobs), device="cpu", where=f"task {t.label}: reward")
            except RewardChoiceError as exc:
                raise SuiteError(f"{suite.path}: {exc}") from None


def feedback_jobs(suite: Suite, out: Path) -> tuple[list, list]:
    """``(reward-model jobs, best-of-n jobs)`` not yet done, as the runner's ``(key, fn, args)``."""
    rm_jobs, bon_jobs, seen = [], [], set()
    for t in suite.tasks:
        for seed in suite.seeds:
            if t.reward == LEARNED and rm_dir(out, t, seed) not in seen:
                seen.add(rm_dir(out, t, seed))
                if (read_result(rm_dir(out, t, seed)) or {}).get("status") != "ok":
                    key = f"{t.rm_key}/{RM_ALGORITHM}/seed{seed}"
                    rm_jobs.append((key, train_reward_model, (t, seed, str(out), suite.device, suite.generator)))
            if t.pipeline.get("best_of_n") and (read_result(bon_dir(out, t, seed)) or {}).get("status") != "ok":
                args = (t, seed, str(out), suite.device, suite.generator)
                bon_jobs.append((f"{t.label}/{BON_ALGORITHM}/seed{seed}", run_best_of_n, args))
    return rm_jobs, bon_jobs


def split_jobs(cells: list, rm_jobs: list, bon_jobs: list) -> tuple[list, list]:
    """Two phases: the reward models and the jobs that need none (cells of gold tasks), then the rest."""
    needs_rm = [job for job in cells + bon_jobs if _entry(job).reward == LEARNED]
    return rm_jobs + [job for job in cells + bon_jobs if job not in needs_rm], needs_rm


def _entry(job) -> TaskEntry:
    """The task entry of a runner job: a cell's task, or a stage's first argument."""
    first = job[2][0]
    return first.task if isinstance(first, Cell) else first


def read_result(path: Path) -> dict[str, Any] | None:
    """A stage's ``result.json`` (as the runner reads a cell's), None if absent or unreadable."""
    try:
        return json.loads((path / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result.json`` atomically (the runner imports this module, so not its writer)."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path / "result.json")
    return result


def _device(name: str):
    from rlhf_env.models import resolve_device

    return resolve_device(None if name == "auto" else name)


def _failed(path: Path, base: dict[str, Any], t0: float, exc: BaseException) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "error.txt").write_text(traceback.format_exc())
    error = f"{type(exc).__name__}: {exc}"
    return _write(path, {**base, "status": "failed", "error": error, M.TIME_WALL_S: time.perf_counter() - t0})


def train_reward_model(
    task: TaskEntry, seed: int, out: str, device_name: str, generator: str = DEFAULT_GENERATOR
) -> dict[str, Any]:
    """Label ``pairs`` base-model pairs (sampled by the suite's ``generator``) and fit r_φ on them;
    never raises (a failure is the result)."""
    path = rm_dir(Path(out), task, seed)
    p = task.pipeline
    base = {"stage": RM_ALGORITHM, "task": task.rm_key, "algorithm": RM_ALGORITHM, "seed": seed}
    base.update(pairs=p["pairs"], tau=p["tau"], rm_steps=p["rm_steps"], generator=generator)
    t0 = time.perf_counter()
    try:
        from rlhf_env import plugins
        from rlhf_env.algorithms.run.loop import train
        from rlhf_env.tasks import get_task

        config = {
            "lr": p["rm_lr"],
            "batch_size": min(p["rm_batch_size"], p["pairs"]),
            "num_pairs": p["pairs"],
            "num_heldout_pairs": p["heldout_pairs"],
            "heldout_every": p["rm_steps"],  # held-out accuracy once, after the last step
            "annotator_tau": p["tau"],
        }

        def export(models) -> None:  # the trained trainer: its pairs (for the pair algorithms) and r_φ
            trainer = models.trainer
            with (path / "pairs.jsonl").open("w") as f:
                for pair in trainer.pairs:
                    f.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}))
                    f.write("\n")
            trainer.save_reward_model(path / "model")

        path.mkdir(parents=True, exist_ok=True)
        # The training loop's stages, as ``rlhf train reward_model`` runs them (seeds included): no policy
        # evaluation, one checkpoint at the end, which a rerun resumes from.
        records = train(
            plugins.get_host().algorithms.get(RM_ALGORITHM),
            get_task(task.name, **task.knobs),
            path / "run",
            steps=p["rm_steps"],
            seed=seed,
            model_path=task.model,
            config=config,
            resume=True,
            eval_every=0,
            checkpoint_every=p["rm_steps"],
            device=_device(device_name),
            progress=False,
            algo_name=RM_ALGORITHM,
            chat_template=task.chat_template,
            generator=generator,
            on_end=export,
        )
        last = records[-1]  # the last step measured the held-out accuracy (heldout_every = rm_steps)
        heldout = {k: last[k] for k in (M.RM_HELDOUT_ACCURACY, M.RM_HELDOUT_GOLD_ACCURACY) if k in last}
        result = {
            **base,
            "status": "ok",
            **heldout,
            M.RM_ACCURACY: last.get(M.RM_ACCURACY),
            M.LOSS_REWARD_MODEL: last.get(M.LOSS_REWARD_MODEL),
            "train_s": sum(r.get(M.PERF_STEP_TIME_S, 0.0) for r in records),
            M.TIME_WALL_S: time.perf_counter() - t0,
        }
        (path / "error.txt").unlink(missing_ok=True)
        return _write(path, result)
    except Exception as exc:  # a failing stage must not stop the suite; its cells fail naming it
        return _failed(path, base, t0, exc)


def proxy_reward(task: TaskEntry, seed: int, out: Path) -> str:
    """The reward a task entry's cells optimise, as ``rlhf train --reward`` takes it."""
    if task.reward != LEARNED:
        return task.reward
    result = json.loads((rm_dir(out, task, seed) / "result.json").read_text())
    if result.get("status") != "ok":
        raise TrainingStoppedError(f"the task's reward model failed: {result.get('error')}")
    return str(rm_dir(out, task, seed) / "model")


def cell_inputs(cell: Cell, out: Path) -> tuple[dict[str, Any], str]:
    """``(config, reward)`` of a cell: its hparams, and for a learned reward the shared reward model and pairs."""
    from rlhf_env import plugins

    config = cell.config
    if cell.task.reward != LEARNED:
        return config, cell.task.reward
    try:
        reward = proxy_reward(cell.task, cell.seed, out)
    except OSError:
        raise TrainingStoppedError("the task's reward model was not trained") from None
    fields = getattr(plugins.get_host().algorithms.get(cell.algorithm).Config, "__dataclass_fields__", {})
    if "preference_file" in fields and config.get("preference_file") is None:
        config["preference_file"] = str(rm_dir(out, cell.task, cell.seed) / "pairs.jsonl")
    return config, reward


def run_best_of_n(
    task: TaskEntry, seed: int, out: str, device_name: str, generator: str = DEFAULT_GENERATOR
) -> dict[str, Any]:
    """Best-of-n of the base model (sampled by ``generator``) against the task's optimised reward,
    n = 1, 2, ..., ``best_of_n``."""
    path = bon_dir(Path(out), task, seed)
    base = {"stage": BON_ALGORITHM, "task": task.label, "algorithm": BON_ALGORITHM, "seed": seed}
    base["generator"] = generator
    t0 = time.perf_counter()
    try:
        from rlhf_env.algorithms.run.reward_choice import resolve_reward
        from rlhf_env.bench.best_of_n import evaluate_best_of_n
        from rlhf_env.tasks import get_task
        from rlhf_env.tasks.base_models import load_base_model

        device = _device(device_name)
        t = get_task(task.name, **task.knobs)
        ref, tok = load_base_model(t, task.model, device=device, progress=False)
        choice = resolve_reward(proxy_reward(task, seed, Path(out)), t, device=device)
        prompts = t.eval_prompts[: task.pipeline["best_of_n_prompts"]]
        n_max, template = task.pipeline["best_of_n"], task.chat_template
        curve = evaluate_best_of_n(
            t, ref, tok, choice.fn, prompts, n_max, seed=seed, chat_template=template, generator=generator
        )
        top = curve[-1]
        figures = {k: v for k, v in top.items() if k != "n" and not (k == M.REWARD_PROXY and choice.is_gold)}
        result = {**base, "status": "ok", **figures, "n": top["n"], "curve": curve}  # no proxy column on gold
        result[M.TIME_WALL_S] = time.perf_counter() - t0
        (path / "error.txt").unlink(missing_ok=True)
        return _write(path, result)
    except Exception as exc:
        return _failed(path, base, t0, exc)


def summary(result: dict[str, Any]) -> str:
    """The runner's one line for a pipeline stage."""
    key = f"{result['task']}/{result['algorithm']}/seed{result['seed']}"
    if result["status"] != "ok":
        return f"  FAILED {key}: {result['error']}"
    wall = result[M.TIME_WALL_S]
    if result["stage"] == RM_ALGORITHM:
        gold = result.get(M.RM_HELDOUT_GOLD_ACCURACY)
        gold_txt = f", {gold:.3f} vs gold order" if gold is not None else ""
        return (
            f"  rm     {key}: {result['pairs']} pairs, held-out accuracy {result[M.RM_HELDOUT_ACCURACY]:.3f} "
            f"vs annotators{gold_txt} ({wall:.0f} s)"
        )
    proxy = f" proxy {result[M.REWARD_PROXY]:+.3f}" if M.REWARD_PROXY in result else ""
    return (
        f"  bon    {key}: best-of-{result['n']} gold {result[M.REWARD_GOLD]:+.3f}{proxy} "
        f"KL {result[M.OBJECTIVE_KL_BEST_OF_N]:.2f} ({wall:.0f} s)"
    )
