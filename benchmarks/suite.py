"""Benchmark suites: TOML files naming tasks, algorithms, seeds, one budget and hyperparameters.

A suite expands into cells, one training run per (task, algorithm, seed), all of a task's
cells on the same budget. ``algorithms = "all"`` is resolved against the plugin registry
when the suite runs, so a third-party algorithm joins without editing the suite.

    name = "default"
    seeds = [0, 1]
    algorithms = "all"            # or ["ppo", "grpo"]; "exclude" drops names from "all"
    workers = 2                   # cells run at once, each in its own process (0: in this process)
    generator = "kv_cache"        # the registered generator of every cell's rollouts and the pipeline's pairs
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
    lora = { rank = 16, alpha = 32 }  # LoRA adapters for the cells (rlhf train --lora-*: rank, alpha, dropout,
                                  # target_modules); top-level or per task (replacing it; false: every weight)

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

from rlhf_env.algorithms.run.overrides import ConfigError, signature_types, typed_values
from rlhf_env.bench import suite_keys as keys
from rlhf_env.bench.suite_keys import GOLD, LEARNED, PIPELINE_DEFAULTS, SWEEPS, SuiteError
from rlhf_env.generation import DEFAULT_GENERATOR
from rlhf_env.tasks import UNIVERSAL_KNOBS

# The names other modules import from here (the keys' checks live in ``suite_keys``).
__all__ = ["GOLD", "LEARNED", "PIPELINE_DEFAULTS", "SWEEPS", "Cell", "Suite", "SuiteError", "TaskEntry", "load_suite"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SUITES_DIR = Path(__file__).parent / "suites"
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
    "lora",
}
TASK_KEYS = {"name", "label", "knobs", "budget", "hparams", "model", "reward", "pipeline", "chat_template", "lora"}


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
    lora: dict[str, Any] | None = None  # LoraSettings.as_dict() of its cells' adapters; None: full fine-tuning


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
    generator: str = (
        DEFAULT_GENERATOR  # of every cell's rollouts and the pipeline's samples (``rlhf train --generator``)
    )

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


def _expand(entry: TaskEntry, pipeline: dict[str, Any], host) -> list[TaskEntry]:
    """One entry per combination of the swept pipeline values, labelled ``<label>-N256-tau0.5``."""
    import itertools

    swept_keys = list(SWEEPS)
    lists = [v if isinstance(v, list) else [v] for v in (pipeline[k] for k in swept_keys)]
    out = []
    for combo in itertools.product(*lists):
        values = dict(zip(swept_keys, combo))
        swept = {SWEEPS[k]: v for k, v in values.items() if len(lists[swept_keys.index(k)]) > 1}
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


def _task(t: Any, where: str, i: int, hparams: dict, budget: dict, host, top: dict) -> list[TaskEntry]:
    """``tasks[i]``: a registered task, knobs its factory takes (typed), its own budget, hparams, reward and
    pipeline; one entry per combination of swept pipeline values."""
    tw = f"{where}: tasks[{i}]"
    if not isinstance(t, dict) or "name" not in t:
        raise SuiteError(f"{tw}: each task needs a name")
    bad = set(t) - TASK_KEYS
    if bad:
        raise SuiteError(f"{tw}: unknown keys {sorted(bad)}; known: {sorted(TASK_KEYS)}")
    keys.known(host.tasks, t["name"], f"{tw}.name", "task")
    knobs = t.get("knobs", {})
    if not isinstance(knobs, dict):
        raise SuiteError(f"{tw}: knobs must be a table, got {knobs!r}")
    types = signature_types(host.tasks.get(t["name"]))
    if types is not None:  # a factory taking **kwargs checks its knobs itself
        try:  # with the knobs every task takes (max_new_tokens)
            knobs = typed_values({**UNIVERSAL_KNOBS, **types}, knobs, where=f"{tw}.knobs", what="knobs")
        except ConfigError as exc:
            raise SuiteError(str(exc)) from None
    own = keys.hparams(t.get("hparams", {}), where, host, f"tasks[{i}].hparams.{{}}")
    task_hparams = {a: {**hparams.get(a, {}), **h} for a, h in own.items()}
    tb = keys.budget(t["budget"], f"{tw}.budget") if "budget" in t else budget
    model = keys.string(t, "model", tw)
    if model is not None and not keys.model_exists(model):
        raise SuiteError(f"{tw}: model {model!r} is not a local folder, a .gguf file or package:NAME")
    label = keys.string(t, "label", tw, t["name"])
    reward = keys.reward(t, tw, top["reward"])
    pipeline = keys.pipeline(t.get("pipeline", {}), tw, top["pipeline"])
    keys.check_sweep(pipeline, reward, tw)
    entry = TaskEntry(label, t["name"], knobs, tb, {**hparams, **task_hparams}, model, reward)
    entry = replace(
        entry, chat_template=keys.chat_template(t, tw, top["chat_template"]), lora=keys.lora(t, tw, top["lora"])
    )
    return _expand(entry, pipeline, host)


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
        for a in keys.names(algorithms, where, "algorithms"):
            keys.known(host.algorithms, a, f"{where}: algorithms", "algorithm")
    exclude = keys.names(raw.get("exclude", []), where, "exclude")
    for a in exclude:
        keys.known(host.algorithms, a, f"{where}: exclude", "algorithm")
    budget = keys.budget(raw["budget"], f"{where}: [budget]")
    hparams = keys.hparams(raw.get("hparams", {}), where, host)
    if not isinstance(raw["tasks"], list) or not raw["tasks"]:
        raise SuiteError(f"{where}: tasks must be a non-empty array of tables ([[tasks]])")
    top = {
        "reward": keys.reward(raw, where, GOLD),
        "pipeline": keys.pipeline(raw.get("pipeline", {}), where, PIPELINE_DEFAULTS),
        "chat_template": keys.chat_template(raw, where, "auto"),
        "lora": keys.lora(raw, where, None),
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
        keys.known(host.generators, raw["generator"], f"{where}: generator", "generator")
        opts["generator"] = raw["generator"]
    name, description = keys.string(raw, "name", where, path.stem), keys.string(raw, "description", where, "")
    return Suite(name, path, tasks, algorithms, seeds, exclude, description, **opts)
