"""Benchmark suites: TOML files naming tasks, algorithms, seeds, one budget and hyperparameters.

A suite expands into cells, one training run per (task, algorithm, seed), all of a task's
cells on the same budget. ``algorithms = "all"`` is resolved against the plugin registry
when the suite runs, so a third-party algorithm joins without editing the suite.

    name = "default"
    seeds = [0, 1]
    algorithms = "all"            # or ["ppo", "grpo"]; "exclude" drops names from "all"
    workers = 2                   # cells run at once, each in its own process (0: in this process)
    generator = "kv_cache"        # the registered generator every cell's rollouts sample with
    [budget]
    tokens = 40000                # training tokens per run, or seconds = 60 (wall-clock)
    [hparams.ppo]                 # per-algorithm config overrides (algorithm Config fields)
    lr = 3e-4
    [[tasks]]
    name = "sentiment"            # a registered task; knobs = {...}, budget and hparams override
    reward = "learned"            # gold (default), learned (the RLHF pipeline), or any `rlhf train --reward`
    pipeline = { pairs = [256, 1024], tau = 0.25 }  # lists sweep: one task entry per combination
    chat_template = "none"        # auto (default: the tokenizer's chat template when it has one) or none;
                                  # top-level or per task

``reward = "learned"`` runs the RLHF pipeline (``rlhf_env.bench.pipeline``): per task and seed,
``pairs`` annotator-labelled pairs (temperature ``tau``) of the base model train one reward
model, which every online cell optimises and whose pairs every offline cell learns from.
``pipeline`` keys (top-level table or per task): ``pairs``, ``tau`` and ``beta`` (the KL
coefficient of every algorithm that has one: ``kl_coef`` or ``beta``) take a value or a list
to sweep; ``rm_steps``, ``rm_lr``, ``rm_batch_size``, ``heldout_pairs`` size the reward model;
``best_of_n`` (a power of two, 0: off) and ``best_of_n_prompts`` the best-of-n baseline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhf_env.algorithms.run.overrides import ConfigError, signature_types, typed_overrides, typed_values
from rlhf_env.errors import UserError
from rlhf_env.generation import DEFAULT_GENERATOR
from rlhf_env.tasks import UNIVERSAL_KNOBS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUITES_DIR = Path(__file__).parent / "suites"
BUDGET_KEYS = ("tokens", "seconds")
TOP_KEYS = {
    "name",
    "description",
    "seeds",
    "algorithms",
    "exclude",
    "budget",
    "hparams",
    "tasks",
    "workers",
    "threads",
    "device",
    "eval_points",
    "eval_prompts",
    "checkpoint_every",
    "reward",
    "pipeline",
    "chat_template",
    "generator",
}
TASK_KEYS = {"name", "label", "knobs", "budget", "hparams", "model", "reward", "pipeline", "chat_template"}
GOLD, LEARNED = "gold", "learned"
# The pipeline's keys, defaults and types; SWEEPS take a list of values to sweep.
PIPELINE_DEFAULTS: dict[str, Any] = {
    "pairs": 256,  # N: the feedback budget, labelled pairs per task and seed
    "tau": 0.25,  # the simulated annotators' temperature
    "beta": None,  # the KL coefficient of every algorithm that has one (None: each algorithm's own)
    "rm_steps": 100,
    "rm_lr": 1e-3,
    "rm_batch_size": 64,
    "heldout_pairs": 256,  # fresh annotator pairs on held-out prompts, for the reward model's accuracy
    "best_of_n": 0,  # the largest n of the best-of-n baseline (a power of two; 0: no baseline)
    "best_of_n_prompts": 64,
}
PIPELINE_TYPES = {k: float if k in ("tau", "beta", "rm_lr") else int for k in PIPELINE_DEFAULTS}
SWEEPS = {"pairs": "N", "tau": "tau", "beta": "beta"}  # key -> its name in labels and tables


class SuiteError(UserError, ValueError):
    """A suite file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class TaskEntry:
    label: str  # unique within the suite; names the task's folder
    name: str  # registered task name
    knobs: dict[str, Any]
    budget: dict[str, float]
    hparams: dict[str, dict[str, Any]]
    model: str | None = None  # a local checkpoint instead of the task's base model
    reward: str = GOLD  # gold, learned, or an `rlhf train --reward` value
    pipeline: dict[str, Any] = field(default_factory=dict)  # PIPELINE_DEFAULTS' keys, one value each
    sweep: dict[str, Any] = field(default_factory=dict)  # the swept values of this entry ({"N": 256})
    rm_key: str = ""  # entries that share a reward model share this (task, N, tau)
    chat_template: str = "auto"  # rlhf_env.prompt_format mode of every env and offline encoding of the entry


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
    generator: str = DEFAULT_GENERATOR  # the registered generator of every cell's rollouts (``rlhf train --generator``)

    def algorithm_names(self, host=None) -> list[str]:
        """The suite's algorithms; ``all`` is every registered algorithm that trains a policy."""
        from rlhf_env import plugins

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
        raise SuiteError(
            f"{where}: unknown budget keys {sorted(bad)}; a budget is equal across algorithms, "
            f"in training tokens or wall-clock seconds: {list(BUDGET_KEYS)}"
        )
    for k, v in raw.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise SuiteError(f"{where}: budget.{k} must be a positive number, got {v!r}")
    return dict(raw)


def _hparams(raw: Any, where: str, host, table: str = "[hparams.{}]") -> dict[str, dict[str, Any]]:
    """Per-algorithm config tables, each algorithm registered and each value of its field's type.

    ``table``: how messages name an algorithm's table (``[hparams.ppo]``, ``tasks[0].hparams.ppo``).
    """
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SuiteError(f"{where}: hparams must be tables per algorithm, like [hparams.ppo], got {raw!r}")
    out = {}
    for algo, values in raw.items():
        label = f"{where}: {table.format(algo)}"
        _known(host.algorithms, algo, label, "algorithm")
        try:
            out[algo] = typed_overrides(host.algorithms.get(algo).Config, values, where=label)
        except ConfigError as exc:
            raise SuiteError(str(exc)) from None
    return out


def _known(registry, name: Any, where: str, kind: str) -> None:
    if not isinstance(name, str) or name not in registry:
        raise SuiteError(f"{where}: unknown {kind} {name!r}; registered: {', '.join(sorted(registry.names()))}")


def _names(raw: Any, where: str, key: str) -> list[str]:
    """A list of distinct names (a string is not a list of its letters)."""
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise SuiteError(f"{where}: {key} must be a list of names, got {raw!r}")
    repeated = sorted({a for a in raw if raw.count(a) > 1})
    if repeated:
        raise SuiteError(f"{where}: {key} lists {repeated} more than once")
    return list(raw)


def _string(raw: dict, key: str, where: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is not default and not isinstance(value, str):
        raise SuiteError(f"{where}: {key} must be a string, got {type(value).__name__} {value!r}")
    return value


def _pipeline(raw: Any, where: str, base: dict[str, Any]) -> dict[str, Any]:
    """A ``pipeline`` table over ``base``: known keys, values of their type (> 0), lists where sweepable."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: pipeline must be a table, got {raw!r}")
    bad = sorted(set(raw) - set(PIPELINE_DEFAULTS))
    if bad:
        raise SuiteError(f"{where}: unknown pipeline keys {bad}; known: {sorted(PIPELINE_DEFAULTS)}")
    out = dict(base)
    for key, value in raw.items():
        values = value if isinstance(value, list) and key in SWEEPS else [value]
        if not values:
            raise SuiteError(f"{where}: pipeline.{key} is an empty list")
        tp = PIPELINE_TYPES[key]
        for v in values:
            ok = isinstance(v, (int, float) if tp is float else int) and not isinstance(v, bool)
            ok = ok and (v >= 0 if key == "best_of_n" else v > 0)
            if ok and key == "best_of_n":
                ok = v == 0 or not v & (v - 1)
            if not ok:
                kind = (
                    "a power of two or 0"
                    if key == "best_of_n"
                    else f"{'a number' if tp is float else 'an integer'} > 0"
                )
                hint = " (or a list of them)" if key in SWEEPS else ""
                raise SuiteError(f"{where}: pipeline.{key} must be {kind}{hint}, got {v!r}")
        out[key] = [tp(v) for v in values] if key in SWEEPS else tp(values[0])
    return out


def _expand(entry: TaskEntry, pipeline: dict[str, Any], host) -> list[TaskEntry]:
    """One entry per combination of the swept pipeline values, labelled ``<label>-N256-tau0.5``."""
    import itertools

    keys = list(SWEEPS)
    lists = [v if isinstance(v, list) else [v] for v in (pipeline[k] for k in keys)]
    out = []
    for combo in itertools.product(*lists):
        values = dict(zip(keys, combo))
        swept = {SWEEPS[k]: v for k, v in values.items() if len(lists[keys.index(k)]) > 1}
        label = entry.label + "".join(f"-{name}{v:g}" for name, v in swept.items())
        hparams = {a: dict(h) for a, h in entry.hparams.items()}
        if values["beta"] is not None:  # the KL coefficient of every algorithm that has one
            for name in host.algorithms.names():
                spec = host.algorithms.get(name)
                fields = getattr(spec.Config, "__dataclass_fields__", {})
                coef = "kl_coef" if "kl_coef" in fields else "beta" if "beta" in fields else None
                if not getattr(spec.Trainer, "uses_reference", True):
                    coef = None  # a reference-free method (SimPO): its β is not a KL coefficient
                if coef:
                    hparams.setdefault(name, {})[coef] = values["beta"]
        rm_key = f"{entry.label}-N{values['pairs']}-tau{values['tau']:g}"
        scalars = {**pipeline, **values}
        out.append(replace(entry, label=label, hparams=hparams, pipeline=scalars, sweep=swept, rm_key=rm_key))
    return out


def _check_sweep(pipeline: dict[str, Any], reward: str, where: str) -> None:
    """Sweeping the feedback (pairs, tau) only changes a learned reward: elsewhere it makes identical cells."""
    swept = [k for k in ("pairs", "tau") if isinstance(pipeline[k], list) and len(pipeline[k]) > 1]
    if swept and reward != LEARNED:
        raise SuiteError(
            f"{where}: pipeline.{swept[0]} sweeps {pipeline[swept[0]]} but the task's reward is {reward!r}: "
            f"{' and '.join(swept)} only shape a learned reward, so every entry would run the same cells; "
            'give one value, or set reward = "learned"'
        )


def _reward(raw: dict, where: str, default: str) -> str:
    value = raw.get("reward", default)
    if not isinstance(value, str) or not value.strip():
        raise SuiteError(
            f"{where}: reward must be gold, learned, a registered reward or a reward model folder, got {value!r}"
        )
    return value


def _chat_template(raw: dict, where: str, default: str) -> str:
    from rlhf_env.prompt_format import CHAT_TEMPLATE_MODES

    value = raw.get("chat_template", default)
    if value not in CHAT_TEMPLATE_MODES:
        raise SuiteError(f"{where}: chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {value!r}")
    return value


def _task(t: Any, where: str, i: int, hparams: dict, budget: dict, host, top: dict) -> list[TaskEntry]:
    """``tasks[i]``: a registered task, knobs its factory takes (typed), its own budget, hparams, reward and
    pipeline; one entry per combination of swept pipeline values."""
    tw = f"{where}: tasks[{i}]"
    if not isinstance(t, dict) or "name" not in t:
        raise SuiteError(f"{tw}: each task needs a name")
    bad = set(t) - TASK_KEYS
    if bad:
        raise SuiteError(f"{tw}: unknown keys {sorted(bad)}; known: {sorted(TASK_KEYS)}")
    _known(host.tasks, t["name"], f"{tw}.name", "task")
    knobs = t.get("knobs", {})
    if not isinstance(knobs, dict):
        raise SuiteError(f"{tw}: knobs must be a table, got {knobs!r}")
    types = signature_types(host.tasks.get(t["name"]))
    if types is not None:  # a factory taking **kwargs checks its knobs itself
        try:  # with the knobs every task takes (max_new_tokens)
            knobs = typed_values({**UNIVERSAL_KNOBS, **types}, knobs, where=f"{tw}.knobs", what="knobs")
        except ConfigError as exc:
            raise SuiteError(str(exc)) from None
    own = _hparams(t.get("hparams", {}), where, host, f"tasks[{i}].hparams.{{}}")
    task_hparams = {a: {**hparams.get(a, {}), **h} for a, h in own.items()}
    tb = _budget(t["budget"], f"{tw}.budget") if "budget" in t else budget
    model = _string(t, "model", tw)
    if model is not None and not _model_exists(model):
        raise SuiteError(f"{tw}: model {model!r} is not a local folder, a .gguf file or package:NAME")
    label = _string(t, "label", tw, t["name"])
    reward = _reward(t, tw, top["reward"])
    pipeline = _pipeline(t.get("pipeline", {}), tw, top["pipeline"])
    _check_sweep(pipeline, reward, tw)
    entry = TaskEntry(label, t["name"], knobs, tb, {**hparams, **task_hparams}, model, reward)
    entry = replace(entry, chat_template=_chat_template(t, tw, top["chat_template"]))
    return _expand(entry, pipeline, host)


def _model_exists(model: str) -> bool:
    from rlhf_env import gguf

    if gguf.is_package_ref(model):
        return gguf.packaged(model[len(gguf.PACKAGE_PREFIX) :]) is not None
    path = Path(model).expanduser()
    return path.is_file() if gguf.is_gguf(model) else path.is_dir()


def load_suite(suite: str | Path, host=None) -> Suite:
    """Parse and check a suite (a path or a shipped name) against the registry; errors name the file and key.

    Every algorithm and task name (in lists and ``[hparams.*]`` tables) must be registered, and
    every hyperparameter and knob of its field's type, before any cell runs.
    """
    from rlhf_env import plugins

    host = host or plugins.get_host()
    path = resolve(suite)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
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
    if algorithms != "all":
        if not isinstance(algorithms, list) or not algorithms:
            raise SuiteError(f'{where}: algorithms must be "all" or a list of names, got {algorithms!r}')
        for a in _names(algorithms, where, "algorithms"):
            _known(host.algorithms, a, f"{where}: algorithms", "algorithm")
    exclude = _names(raw.get("exclude", []), where, "exclude")
    for a in exclude:
        _known(host.algorithms, a, f"{where}: exclude", "algorithm")
    budget = _budget(raw["budget"], f"{where}: [budget]")
    hparams = _hparams(raw.get("hparams", {}), where, host)
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise SuiteError(f"{where}: tasks must be a non-empty array of tables ([[tasks]])")
    top = {
        "reward": _reward(raw, where, GOLD),
        "pipeline": _pipeline(raw.get("pipeline", {}), where, PIPELINE_DEFAULTS),
        "chat_template": _chat_template(raw, where, "auto"),
    }
    tasks = [e for i, t in enumerate(raw["tasks"]) for e in _task(t, where, i, hparams, budget, host, top)]
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise SuiteError(f"{where}: task labels repeat {labels}; give repeated tasks a distinct label")
    opts = {
        k: raw[k]
        for k in ("workers", "threads", "device", "eval_points", "eval_prompts", "checkpoint_every")
        if k in raw
    }
    for k in ("workers", "threads", "eval_points", "eval_prompts", "checkpoint_every"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "workers" else 1)):
            raise SuiteError(f"{where}: {k} must be an integer >= {0 if k == 'workers' else 1}, got {v!r}")
    if opts.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise SuiteError(f"{where}: device must be auto, cpu or cuda, got {opts['device']!r}")
    if "generator" in raw:
        _known(host.generators, raw["generator"], f"{where}: generator", "generator")
        opts["generator"] = raw["generator"]
    name, description = _string(raw, "name", where, path.stem), _string(raw, "description", where, "")
    return Suite(name, path, tasks, algorithms, seeds, exclude, description, **opts)
