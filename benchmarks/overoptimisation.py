"""The report's RLHF parts: which setting each task is, its reward model, the overoptimisation plot.

``overoptimisation.png``: per task, gold (top) and proxy (bottom) reward against KL to the
reference, every algorithm's path from the base model through its evaluations (means over
seeds, bands ±std over seeds) and best-of-n (n = 1 … 64, KL = log n − (n−1)/n) as the
reference curve (Gao et al. 2022). On a verifiable-reward task the proxy is the gold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench import pipeline
from rlhf_env.bench.cells import read_result, run_dir
from rlhf_env.bench.suite import GOLD, LEARNED, Suite, TaskEntry


def reward_models(suite: Suite, out: Path) -> dict[str, list[dict]]:
    """``{rm_key: [result per seed]}`` of the learned-reward tasks' reward models (``missing`` if absent)."""
    found: dict[str, list[dict]] = {}
    for t in suite.tasks:
        if t.reward == LEARNED and t.rm_key not in found:
            found[t.rm_key] = [
                read_result(pipeline.rm_dir(out, t, s)) or {"status": "missing", "task": t.rm_key, "seed": s}
                for s in suite.seeds
            ]
    return found


def setting_lines(task: TaskEntry, rms: list[dict], fmt) -> list[str]:
    """The lines under a task's heading saying which setting it is (and its reward model's accuracy)."""
    p = task.pipeline
    swept = ", ".join(f"{k} = {v:g}" for k, v in task.sweep.items())
    swept = f" Swept: {swept}." if swept else ""
    if task.reward == GOLD:
        return [f"*Verifiable reward*: every method optimises the task's gold reward directly.{swept}", ""]
    if task.reward != LEARNED:
        return [f"*Chosen reward* `{task.reward}`: online methods optimise it; gold is measured.{swept}", ""]
    ok = [r for r in rms if r.get("status") == "ok"]
    acc = fmt([r[M.RM_HELDOUT_ACCURACY] for r in ok], 3)
    gold_acc = fmt([r[M.RM_HELDOUT_GOLD_ACCURACY] for r in ok if M.RM_HELDOUT_GOLD_ACCURACY in r], 3)
    wall = fmt([r[M.TIME_WALL_S] for r in ok], 0)
    return [
        f"*Learned reward (RLHF)*: {p['pairs']} base-model pairs labelled by simulated annotators "
        f"(Bradley-Terry on the gold, τ = {p['tau']:g}) train one reward model per seed "
        f"({p['rm_steps']} steps, {wall} s); online methods optimise it (proxy), offline methods learn "
        f"from the same pairs, SFT from demonstrations; gold is measured on held-out prompts.{swept}",
        "",
        f"Reward model held-out pair accuracy: {acc} against fresh annotator labels, {gold_acc} against "
        f"the gold order ({p['heldout_pairs']} pairs on held-out prompts, {len(ok)} seeds).",
        "",
    ]


def _eval_points(out: Path, row: dict, start: tuple[float, float, float]) -> np.ndarray:
    """(k, 3) [kl, gold, proxy] at the cell's evaluations, from ``start`` (the base model)."""
    points = [start]
    path = run_dir(out, row["task"], row["algorithm"], row["seed"]) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if M.REWARD_GOLD in r:
            points.append((r[M.OBJECTIVE_KL_EVAL], r[M.REWARD_GOLD], r.get(M.REWARD_PROXY, r[M.REWARD_GOLD])))
    return np.array(points, dtype=float)


def _band(ax, pts: list[np.ndarray], color, label: str, style: str = "-o") -> None:
    """Mean over seeds of evaluation k, a ±std band on y; ``pts``: per seed (k, 2) [x, y]."""
    k = min(len(p) for p in pts)
    stack = np.stack([p[:k] for p in pts])
    m, s = stack.mean(0), stack.std(0, ddof=1 if len(pts) > 1 else 0)
    ax.plot(m[:, 0], m[:, 1], style, ms=3, color=color, label=label, alpha=0.9)
    ax.fill_between(m[:, 0], m[:, 1] - s[:, 1], m[:, 1] + s[:, 1], color=color, alpha=0.15, linewidth=0)


def write_plot(out: Path, suite: Suite, bases: dict[str, dict], rows: list[dict]) -> Path | None:
    """``overoptimisation.png`` (see the module doc); None when no task has a base model."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    tasks = [t for t in suite.tasks if bases[t.label].get("status") == "ok"]
    if not tasks:
        return None
    algos = [a for a in dict.fromkeys(r["algorithm"] for r in rows) if a != pipeline.BON_ALGORITHM]
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(algos)}
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
    for col, task in enumerate(tasks):
        ok = [r for r in rows if r["task"] == task.label and r["status"] == "ok"]
        bon = [r for r in ok if r["algorithm"] == pipeline.BON_ALGORITHM]
        base_gold = bases[task.label][M.REWARD_GOLD]
        # The base model's proxy: best-of-1 is one base-model sample per prompt.
        base_proxy = np.mean([r["curve"][0][M.REWARD_PROXY] for r in bon]) if bon else np.nan
        if task.reward == GOLD:
            base_proxy = base_gold
        for row, (name, y) in enumerate((("gold", 1), ("proxy", 2))):
            ax = axes[row][col]
            for algo in algos:
                pts = [_eval_points(out, r, (0.0, base_gold, base_proxy)) for r in ok if r["algorithm"] == algo]
                pts = [p[:, [0, y]] for p in pts if len(p) > 1]
                if pts:
                    _band(ax, pts, colors[algo], algo)
            if bon:
                key = M.REWARD_GOLD if y == 1 else M.REWARD_PROXY
                curves = [np.array([(c[M.OBJECTIVE_KL_BEST_OF_N], c[key]) for c in r["curve"]]) for r in bon]
                _band(ax, curves, "black", f"best-of-n (n ≤ {bon[0]['n']})", style="--s")
            what = "gold reward (held-out prompts)" if y == 1 else _proxy_label(task)
            ax.set(title=f"{task.label}: {name}", xlabel="KL to the reference (nats per completion)", ylabel=what)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(
        f"rlhf bench — {suite.name}: gold and proxy against KL\n({len(suite.seeds)} seeds; lines: mean, bands: ±std)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "overoptimisation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _proxy_label(task: TaskEntry) -> str:
    if task.reward == GOLD:
        return "optimised reward (= gold, verifiable)"
    if task.reward == LEARNED:
        return "proxy: the reward model's score"
    return f"proxy: {task.reward}"
