"""Tables and plots of a suite's results: ``results.csv``, ``results.md`` and three PNGs.

- ``results.csv``: one row per cell (and per task's base model), the raw figures.
- ``results.md``: per task and algorithm, mean ± std over seeds of the final gold reward,
  KL to the reference, training tokens/s, wall time and peak memory; then a table of each
  algorithm's peak tensor memory against its analytic estimate (``rlhf_env.algorithms.run.memory``).
- ``frontier.png``: gold reward against KL to the reference, each algorithm's path from the
  base model through its evaluations (means over seeds; bars: std of the final point).
- ``gold_vs_tokens.png``, ``gold_vs_time.png``: gold reward against training tokens and
  against training time, one line per algorithm with a ±std band over seeds.

Every cell evaluates at the same fractions of its budget, so curves average evaluation k
over seeds (gold, KL, tokens and time alike); the last point is the table's figure.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench import overoptimisation, pipeline
from rlhf_env.bench.cells import base_dir, cell_dir, read_result, run_dir
from rlhf_env.bench.suite import Suite

# The figures of a cell's result.json, named as in metrics.jsonl.
FIGURES = [
    M.REWARD_GOLD,
    M.REWARD_GOLD_SE,
    M.REWARD_PROXY,
    M.OBJECTIVE_KL_EVAL,
    M.PERF_TOKENS_TOTAL,
    M.PERF_MEAN_TOKENS_PER_S,
    M.TIME_ELAPSED_S,
    M.TIME_WALL_S,
    M.PERF_PEAK_MEM_MB,
    M.MEMORY_ESTIMATE_MB,
    M.MEMORY_PEAK_MB,
    M.TIME_STEPS,
]
EXTRA_CSV = [M.OBJECTIVE_KL_BEST_OF_N, M.RM_HELDOUT_ACCURACY, M.RM_HELDOUT_GOLD_ACCURACY]
# A multi-turn task's own table: what its episodes did, base model included.
TURN_COLUMNS = [(M.EPISODE_TURNS, 2), (M.TOOL_CALL_RATE, 2), (M.TOOL_CALL_ACCURACY, 2)]
FIGURES += [name for name, _ in TURN_COLUMNS]
CSV_FIELDS = ["task", "algorithm", "seed", "status", *FIGURES, *EXTRA_CSV, "lora", "device", "error"]
# results.md columns after the seeds: (metric, decimals).
TABLE_COLUMNS = [
    (M.REWARD_GOLD, 3),
    (M.REWARD_PROXY, 3),
    (M.OBJECTIVE_KL_EVAL, 2),
    (M.PERF_MEAN_TOKENS_PER_S, 0),
    (M.TIME_WALL_S, 0),
    (M.PERF_PEAK_MEM_MB, 0),
]


def collect(suite: Suite, out: Path) -> tuple[dict[str, dict], list[dict]]:
    """``(base results by task label, cell results)``; a cell with no result is ``missing``.

    Best-of-n baselines are rows too (algorithm ``best_of_n``; KL is its closed form)."""
    bases = {t.label: read_result(base_dir(out, t)) or {"status": "missing", "task": t.label} for t in suite.tasks}
    rows = []
    for c in suite.cells():
        r = read_result(cell_dir(out, c)) or {"status": "missing", "error": "not run"}
        rows.append({**r, "task": c.task.label, "algorithm": c.algorithm, "seed": c.seed})
    for t in suite.tasks:
        for seed in suite.seeds if t.pipeline.get("best_of_n") else []:
            r = read_result(pipeline.bon_dir(out, t, seed)) or {"status": "missing", "error": "not run"}
            rows.append({**r, "task": t.label, "algorithm": pipeline.BON_ALGORITHM, "seed": seed})
    return bases, rows


def curve(out: Path, row: dict, base_gold: float) -> np.ndarray:
    """(n, 4) [tokens, seconds, gold, kl] at the cell's evaluations, starting at the base model."""
    points = [(0.0, 0.0, base_gold, 0.0)]
    path = run_dir(out, row["task"], row["algorithm"], row["seed"]) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if M.REWARD_GOLD in r:
            points.append((r[M.PERF_TOKENS_TOTAL], r[M.TIME_ELAPSED_S], r[M.REWARD_GOLD], r[M.OBJECTIVE_KL_EVAL]))
    return np.array(points)


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}"


def summarise(bases: dict[str, dict], rows: list[dict]) -> list[dict[str, Any]]:
    """One entry per (task, algorithm): the ok seeds' figures (lists, by metric name) and the failed seeds' errors."""
    out = []
    for task, base in bases.items():
        algos = list(dict.fromkeys(r["algorithm"] for r in rows if r["task"] == task))
        for algo in algos:
            ok = [r for r in rows if r["task"] == task and r["algorithm"] == algo and r["status"] == "ok"]
            bad = [r for r in rows if r["task"] == task and r["algorithm"] == algo and r["status"] != "ok"]
            figures = {k: [r[k] for r in ok if k in r] for k in FIGURES}
            if algo == pipeline.BON_ALGORITHM:  # its KL is log n − (n−1)/n, not sampled
                figures[M.OBJECTIVE_KL_EVAL] = [r[M.OBJECTIVE_KL_BEST_OF_N] for r in ok]
            entry = {"task": task, "algorithm": algo, "base_gold": base.get(M.REWARD_GOLD), "ok": ok, "failed": bad}
            out.append({**entry, **figures})
    return out


def turn_lines(entries: list[dict], base: dict) -> list[str]:
    """A multi-turn task's episodes: turns, tool-call rate and accuracy per algorithm (mean ± std over seeds)."""
    if M.EPISODE_TURNS not in base and not any(e.get(M.EPISODE_TURNS) for e in entries):
        return []
    lines = [
        "Episodes (multi-turn): policy turns per episode, share of episodes with a tool call, share of calls that",
        "asked the right question (evaluation samples of the gold):",
        "",
        "| algorithm | turns / episode | tool-call rate | tool-call accuracy |",
        "|---|---|---|---|",
    ]
    if base.get("status") == "ok":
        lines.append(
            "| *base model* | " + " | ".join(_fmt([base[k]] if k in base else [], d) for k, d in TURN_COLUMNS) + " |"
        )
    for e in entries:
        lines.append(f"| {e['algorithm']} | " + " | ".join(_fmt(e.get(k) or [], d) for k, d in TURN_COLUMNS) + " |")
    return [*lines, ""]


def write_csv(path: Path, bases: dict[str, dict], rows: list[dict], rms: dict[str, list[dict]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for task, b in bases.items():
            figures = {k: b.get(k) for k in (M.REWARD_GOLD, M.REWARD_GOLD_SE, M.OBJECTIVE_KL_EVAL, M.TIME_WALL_S)}
            row = {"task": task, "algorithm": "base", "seed": "", "status": b.get("status"), "error": b.get("error")}
            w.writerow({**row, **figures, M.PERF_TOKENS_TOTAL: 0})
        for r in rows + [r for t in rms for r in rms[t]]:
            w.writerow({**{k: r.get(k, "") for k in CSV_FIELDS}, "lora": lora_text(r.get("lora"))})


def lora_text(settings: dict | None) -> str:
    """A cell's LoRA settings (``LoraSettings.as_dict()``) in words; "" for full fine-tuning."""
    if not settings:
        return ""
    alpha = settings["alpha"] if settings.get("alpha") is not None else 2 * settings["rank"]
    targets = settings.get("target_modules")
    where = ", ".join(targets) if targets else "every linear layer but the output head"
    return f"rank {settings['rank']}, α {alpha:g}, dropout {settings.get('dropout', 0.0):g}, on {where}"


def write_markdown(
    path: Path,
    suite: Suite,
    bases: dict[str, dict],
    rows: list[dict],
    rms: dict[str, list[dict]],
    total_s: float | None,
) -> None:
    import torch

    lines = [f"# `rlhf bench` — suite `{suite.name}`", ""]
    if suite.description:
        lines += [suite.description, ""]
    devices = sorted({r.get("device", "") for r in rows if r.get("device")})
    lines += [
        f"Seeds {suite.seeds}; up to {suite.eval_prompts} held-out prompts per evaluation; machine: {platform.processor() or platform.machine()}, "
        f"{_cores()} cores, torch {torch.__version__}, device {', '.join(devices) or '–'}"
        + (f"; whole run {total_s / 60:.1f} min" if total_s else "")
        + ".",
        "",
    ]
    lines += [
        "Gold reward and KL (Σ log π − log π_ref per completion, sampled) are measured on held-out prompts "
        "after the budget is spent; mean ± std over seeds. Tokens/s counts training tokens over training "
        "time (set-up included, evaluation excluded); wall is the whole cell; memory is the peak resident "
        "set (CPU) or peak allocated GPU memory. Proxy is the optimised reward (a learned reward model's "
        "score) of the same held-out samples, where it is not the gold; best-of-n's KL is log n − (n−1)/n.",
        "",
    ]
    summaries = summarise(bases, rows)
    for summary_task in dict.fromkeys(r["task"] for r in rows):
        task = next(t for t in suite.tasks if t.label == summary_task)
        budget = ", ".join(f"{v:,} {k}" for k, v in task.budget.items())
        base = bases[summary_task]
        lines += [
            f"## {summary_task} (budget: {budget} per run)",
            "",
            *overoptimisation.setting_lines(task, rms.get(task.rm_key, []), _fmt),
            *(
                [
                    f"*LoRA*: each trained cell trains adapters ({lora_text(task.lora)}); the base weights stay frozen.",
                    "",
                ]
                if task.lora
                else []
            ),
            "| algorithm | seeds | gold reward | proxy reward | KL to ref | tokens/s | wall s | peak MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        if base.get("status") == "ok":
            lines.append(f"| *base model* | – | {base[M.REWARD_GOLD]:.3f} | – | 0 | – | – | – |")
        entries = [e for e in summaries if e["task"] == summary_task]
        entries.sort(key=lambda e: -mean(e[M.REWARD_GOLD]) if e[M.REWARD_GOLD] else math.inf)
        for e in entries:
            seeds = f"{len(e['ok'])}" + (f" ({len(e['failed'])} failed)" if e["failed"] else "")
            figures = " | ".join(_fmt(e[k], digits) for k, digits in TABLE_COLUMNS)
            name = e["algorithm"]
            if name == pipeline.BON_ALGORITHM and e["ok"]:
                name = f"best-of-{e['ok'][0]['n']} *(baseline)*"
            lines.append(f"| {name} | {seeds} | {figures} |")
        lines.append("")
        lines += gain_lines(entries, base)
        lines += turn_lines(entries, base)
    lines += memory_section(summaries)
    lines += _trl_section(suite, out_dir=path.parent)
    failed = [r for r in rows if r["status"] != "ok"] + [b for b in bases.values() if b.get("status") != "ok"]
    failed += [r for t in rms for r in rms[t] if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed cells", ""]
        for r in failed:
            lines.append(
                f"- `{r['task']}/{r.get('algorithm', 'base')}"
                + (f"/seed{r['seed']}" if "seed" in r else "")
                + f"`: {r.get('error', r['status'])}"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def gain(entry: dict[str, Any], base: dict[str, Any]) -> tuple[float, float] | None:
    """(mean gold over seeds − the base's, its standard error), or None without the figures.

    SE = √(SE_m² + SE_b²): the base's from its per-prompt gold (``reward/gold_se``); the method's
    √(s²/k) over its k seeds, s² at least the mean per-cell evaluation variance (a floor for k = 3,
    whose sample variance alone is noisy)."""
    golds, ses = entry[M.REWARD_GOLD], entry.get(M.REWARD_GOLD_SE) or []
    if not golds or M.REWARD_GOLD_SE not in base or pipeline.BON_ALGORITHM == entry["algorithm"]:
        return None
    k = len(golds)
    s2 = max(stdev(golds) ** 2 if k > 1 else 0.0, mean(se**2 for se in ses) if ses else 0.0)
    return mean(golds) - base[M.REWARD_GOLD], math.sqrt(s2 / k + base[M.REWARD_GOLD_SE] ** 2)


def gain_lines(entries: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """One line: each method's gold gain over the base ± its standard error, marked where above 2 SE."""
    parts = []
    for e in entries:
        g = gain(e, base)
        if g is not None:
            mark = " ✓" if g[0] > 2 * g[1] else ""
            parts.append(f"{e['algorithm']} {g[0]:+.3f} ± {g[1]:.3f}{mark}")
    if not parts:
        return []
    return [
        "Gold gain over the base model ± standard error (base: per-prompt; methods: over seeds, at least "
        "the evaluation's own); ✓: above 2 standard errors. " + "; ".join(parts) + ".",
        "",
    ]


def memory_section(summaries: list[dict[str, Any]]) -> list[str]:
    """Peak tensor memory of the first two steps against the analytic estimate, per task and algorithm."""
    rows = [e for e in summaries if e[M.MEMORY_PEAK_MB] and e[M.MEMORY_ESTIMATE_MB]]
    if not rows:
        return []
    lines = [
        "## Peak memory against the analytic estimate",
        "",
        "Estimate: weights of every model held, gradients and Adam moments of the trained ones, and the "
        "larger of the update's and the rollout's activations (docs/maths.md §24). Measured: peak tensor "
        "memory of the first two steps (CUDA: max allocated; CPU: live tensors at the start plus the "
        "allocator's peak inside, from the PyTorch profiler's memory events). Target: measured ≤ 1.5 × estimate.",
        "",
        "| task | algorithm | estimate MB | measured MB | measured / estimate |",
        "|---|---|---|---|---|",
    ]
    for e in rows:
        ratio = [r[M.MEMORY_PEAK_MB] / r[M.MEMORY_ESTIMATE_MB] for r in e["ok"] if M.MEMORY_ESTIMATE_MB in r]
        figures = [_fmt(e[M.MEMORY_ESTIMATE_MB], 1), _fmt(e[M.MEMORY_PEAK_MB], 1), _fmt(ratio, 2)]
        lines.append(f"| {e['task']} | {e['algorithm']} | " + " | ".join(figures) + " |")
    return lines + [""]


def _trl_section(suite: Suite, out_dir: Path) -> list[str]:
    """Ours beside TRL's trainers (``--baseline trl``) at equal iterations, if that was run."""
    rows = []
    for task in suite.tasks:
        for algo in ("grpo", "dpo"):
            found = [read_result(p) for p in sorted((out_dir / "runs" / task.label / f"trl_{algo}").glob("seed*"))]
            found = [r for r in found if r and r.get("status") == "ok"]
            if found:
                rows.append((task.label, algo, found))
    if not rows:
        return []
    lines = [
        "## Peer baseline: TRL at equal iterations",
        "",
        "Same base model, prompts or pairs, hyperparameters and number of iterations; both evaluated by "
        "`evaluate_policy`. Steps/s counts iterations over set-up plus training time.",
        "",
        "| task | algorithm | seeds | iterations | gold (ours) | gold (TRL) | KL (ours) | KL (TRL) | steps/s (ours) | steps/s (TRL) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, algo, rs in rows:
        cells = [_fmt([r[M.TIME_STEPS] for r in rs], 0)]
        for name, digits in ((M.REWARD_GOLD, 3), (M.OBJECTIVE_KL_EVAL, 2), (M.PERF_STEPS_PER_S, 2)):
            cells += [_fmt([r["ours"][name] for r in rs], digits), _fmt([r[name] for r in rs], digits)]
        lines.append(f"| {task} | {algo} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_plots(out: Path, suite: Suite, bases: dict[str, dict], rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    tasks = [t.label for t in suite.tasks if bases[t.label].get("status") == "ok"]
    if not tasks:
        return []
    algos = list(dict.fromkeys(r["algorithm"] for r in rows))
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(algos)}
    curves = {(r["task"], r["algorithm"]): [] for r in rows}
    for r in rows:
        if r["status"] == "ok":
            curves[(r["task"], r["algorithm"])].append(curve(out, r, bases[r["task"]][M.REWARD_GOLD]))
    written = []
    for fname, x, xlabel in (
        ("gold_vs_tokens.png", 0, "training tokens"),
        ("gold_vs_time.png", 1, "training time (s)"),
        ("frontier.png", 3, "KL to the reference (nats per completion)"),
    ):
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for algo in algos:
                cs = [c for c in curves.get((task, algo), []) if len(c) > 1]
                if not cs:
                    continue
                # Every cell evaluates at the same fractions of its budget: average evaluation k over seeds.
                k = min(len(c) for c in cs)
                pts = np.stack([c[:k] for c in cs])  # (seeds, evaluations, [tokens, seconds, gold, kl])
                m, s = pts.mean(0), pts.std(0, ddof=1 if len(cs) > 1 else 0)  # sample std, as in the table
                ax.plot(m[:, x], m[:, 2], "-o", ms=3, color=colors[algo], label=algo, alpha=0.9)
                if fname == "frontier.png":
                    ax.errorbar(
                        m[-1, 3], m[-1, 2], xerr=s[-1, 3], yerr=s[-1, 2], fmt="o", ms=7, color=colors[algo], capsize=3
                    )
                else:
                    ax.fill_between(
                        m[:, x], m[:, 2] - s[:, 2], m[:, 2] + s[:, 2], color=colors[algo], alpha=0.2, linewidth=0
                    )
            base = bases[task][M.REWARD_GOLD]
            ax.axhline(base, color="grey", ls=":", lw=1, label="base model")
            ax.set(title=task, xlabel=xlabel, ylabel="gold reward (held-out prompts)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(
            f"rlhf bench — {suite.name} ({len(suite.seeds)} seeds; lines: mean, bands/bars: ±std over seeds)",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    return written


def write_report(suite: Suite, out: str | Path, total_s: float | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and the plots into ``out``; returns their paths."""
    out = Path(out)
    bases, rows = collect(suite, out)
    rms = overoptimisation.reward_models(suite, out)
    write_csv(out / "results.csv", bases, rows, rms)
    write_markdown(out / "results.md", suite, bases, rows, rms, total_s)
    paths = {"csv": out / "results.csv", "markdown": out / "results.md"}
    for p in write_plots(out, suite, bases, rows):
        paths[p.stem] = p
    plot = overoptimisation.write_plot(out, suite, bases, rows)
    if plot is not None:
        paths[plot.stem] = plot
    return paths
