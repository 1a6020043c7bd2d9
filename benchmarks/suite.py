"""Benchmark suites: TOML files naming tasks, algorithms, seeds, one budget and hyperparameters.

A suite expands into cells, one training run per (task, algorithm, seed), all of a task's
cells on the same budget. ``algorithms = "all"`` is resolved against the plugin registry
when the suite runs, so a third-party algorithm joins without editing the suite.

    name = "default"
    seeds = [0, 1]
    algorithms = "all"            # or ["ppo", "grpo"]; "exclude" drops names from "all"
    workers = 2                   # cells run at once, each in its own process (0: in this process)
    [budget]
    tokens = 40000                # training tokens per run, or seconds = 60 (wall-clock)
    [hparams.ppo]                 # per-algorithm config overrides (algorithm Config fields)
    lr = 3e-4
    [[tasks]]
    name = "sentiment"            # a registered task; knobs = {...}, budget and hparams override
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUITES_DIR = Path(__file__).parent / "suites"
BUDGET_KEYS = ("tokens", "seconds")
TOP_KEYS = {"name", "description", "seeds", "algorithms", "exclude", "budget", "hparams", "tasks",
            "workers", "threads", "device", "eval_points", "eval_prompts", "checkpoint_every"}  # fmt: skip
TASK_KEYS = {"name", "label", "knobs", "budget", "hparams", "model"}


class SuiteError(ValueError):
    """A suite file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class TaskEntry:
    label: str  # unique within the suite; names the task's folder
    name: str  # registered task name
    knobs: dict[str, Any]
    budget: dict[str, float]
    hparams: dict[str, dict[str, Any]]
    model: str | None = None  # a local checkpoint instead of the task's base model


@dataclass(frozen=True)
class Cell:
    """One training run of the suite."""

    task: TaskEntry
    algorithm: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task.label}/{self.algorithm}/seed{self.seed}"

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.task.hparams.get(self.algorithm, {}))


@dataclass
class Suite:
    name: str
    path: Path
    tasks: list[TaskEntry]
    algorithms: list[str] | str  # names, or "all"
    seeds: list[int]
    exclude: list[str] = field(default_factory=list)
    description: str = ""
    workers: int = 1
    threads: int | None = None  # torch threads per worker (None: cores // workers)
    device: str = "auto"
    eval_points: int = 5
    eval_prompts: int = 64
    checkpoint_every: int = 20

    def algorithm_names(self, host=None) -> list[str]:
        """The suite's algorithms; ``all`` is every registered algorithm that trains a policy."""
        import plugins

        host = host or plugins.get_host()
        if self.algorithms == "all":
            names = [n for n in host.algorithms.names() if getattr(host.algorithms.get(n), "trains_policy", True)]
        else:
            names = list(self.algorithms)
            for n in names:
                host.algorithms.get(n)  # unknown names fail here, listing the registered ones
        return [n for n in names if n not in self.exclude]

    def cells(self, host=None) -> list[Cell]:
        algos = self.algorithm_names(host)
        return [Cell(t, a, s) for t in self.tasks for s in self.seeds for a in algos]


def resolve(suite: str | Path) -> Path:
    """A suite file path, or the name of a suite shipped in ``benchmarks/suites``."""
    path = Path(suite).expanduser()
    if path.is_file():
        return path
    shipped = SUITES_DIR / f"{suite}.toml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in SUITES_DIR.glob("*.toml"))
    raise SuiteError(f"no suite file {str(suite)!r}; shipped suites: {known}")


def _budget(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or not raw:
        raise SuiteError(f"{where}: budget must be a table with tokens and/or seconds, got {raw!r}")
    bad = set(raw) - set(BUDGET_KEYS)
    if bad:
        raise SuiteError(f"{where}: unknown budget keys {sorted(bad)}; a budget is equal across algorithms, "
                         f"in training tokens or wall-clock seconds: {list(BUDGET_KEYS)}")  # fmt: skip
    for k, v in raw.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise SuiteError(f"{where}: budget.{k} must be a positive number, got {v!r}")
    return dict(raw)


def _hparams(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SuiteError(f"{where}: hparams must be tables per algorithm, like [hparams.ppo], got {raw!r}")
    return {k: dict(v) for k, v in raw.items()}


def load_suite(suite: str | Path) -> Suite:
    """Parse and check a suite (a path or a shipped name); errors name the file and key."""
    path = resolve(suite)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from exc
    where = str(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    for key in ("tasks", "seeds", "budget"):
        if key not in raw:
            raise SuiteError(f"{where}: missing {key!r}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SuiteError(f"{where}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: seeds repeat: {seeds}")
    algorithms = raw.get("algorithms", "all")
    if algorithms != "all" and not (isinstance(algorithms, list) and algorithms and all(isinstance(a, str) for a in algorithms)):
        raise SuiteError(f"{where}: algorithms must be \"all\" or a list of names, got {algorithms!r}")
    budget = _budget(raw["budget"], f"{where}: [budget]")
    hparams = _hparams(raw.get("hparams", {}), where)
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise SuiteError(f"{where}: tasks must be a non-empty array of tables ([[tasks]])")
    tasks = []
    for i, t in enumerate(raw["tasks"]):
        tw = f"{where}: tasks[{i}]"
        if not isinstance(t, dict) or "name" not in t:
            raise SuiteError(f"{tw}: each task needs a name")
        bad = set(t) - TASK_KEYS
        if bad:
            raise SuiteError(f"{tw}: unknown keys {sorted(bad)}; known: {sorted(TASK_KEYS)}")
        task_hparams = {a: {**hparams.get(a, {}), **h} for a, h in _hparams(t.get("hparams", {}), tw).items()}
        merged = {**hparams, **task_hparams}
        tb = _budget(t["budget"], f"{tw}.budget") if "budget" in t else budget
        knobs = t.get("knobs", {})
        if not isinstance(knobs, dict):
            raise SuiteError(f"{tw}: knobs must be a table, got {knobs!r}")
        tasks.append(TaskEntry(str(t.get("label", t["name"])), t["name"], knobs, tb, merged, t.get("model")))
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise SuiteError(f"{where}: task labels repeat {labels}; give repeated tasks a distinct label")
    opts = {k: raw[k] for k in ("workers", "threads", "device", "eval_points", "eval_prompts", "checkpoint_every") if k in raw}
    for k in ("workers", "threads", "eval_points", "eval_prompts", "checkpoint_every"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, int) or v < (0 if k == "workers" else 1)):
            raise SuiteError(f"{where}: {k} must be an integer >= {0 if k == 'workers' else 1}, got {v!r}")
    if opts.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise SuiteError(f"{where}: device must be auto, cpu or cuda, got {opts['device']!r}")
    exclude = raw.get("exclude", [])
    return Suite(name=str(raw.get("name", path.stem)), path=path, tasks=tasks, algorithms=algorithms, seeds=seeds,
                 exclude=list(exclude), description=str(raw.get("description", "")), **opts)  # fmt: skip
