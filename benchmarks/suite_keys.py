"""Each key of a suite file, checked and typed: a wrong one is a ``SuiteError`` naming the file and key.

``rlhf_env.bench.suite`` assembles a suite from these: budgets, ``[hparams.*]`` tables (typed
against each algorithm's ``Config``, as ``rlhf train --set``), names in the registry, rewards,
chat templates, local models, and the ``pipeline`` table with the values it sweeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_env.algorithms.run.overrides import ConfigError, typed_overrides
from rlhf_env.errors import UserError

BUDGET_KEYS = ("tokens", "seconds")
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


def budget(raw: Any, where: str) -> dict[str, float]:
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


def hparams(raw: Any, where: str, host, table: str = "[hparams.{}]") -> dict[str, dict[str, Any]]:
    """Per-algorithm config tables, each algorithm registered and each value of its field's type.

    ``table``: how messages name an algorithm's table (``[hparams.ppo]``, ``tasks[0].hparams.ppo``).
    """
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SuiteError(f"{where}: hparams must be tables per algorithm, like [hparams.ppo], got {raw!r}")
    out = {}
    for algo, values in raw.items():
        label = f"{where}: {table.format(algo)}"
        known(host.algorithms, algo, label, "algorithm")
        try:
            out[algo] = typed_overrides(host.algorithms.get(algo).Config, values, where=label)
        except ConfigError as exc:
            raise SuiteError(str(exc)) from None
    return out


def known(registry, name: Any, where: str, kind: str) -> None:
    if not isinstance(name, str) or name not in registry:
        raise SuiteError(f"{where}: unknown {kind} {name!r}; registered: {', '.join(sorted(registry.names()))}")


def names(raw: Any, where: str, key: str) -> list[str]:
    """A list of distinct names (a string is not a list of its letters)."""
    if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
        raise SuiteError(f"{where}: {key} must be a list of names, got {raw!r}")
    repeated = sorted({a for a in raw if raw.count(a) > 1})
    if repeated:
        raise SuiteError(f"{where}: {key} lists {repeated} more than once")
    return list(raw)


def string(raw: dict, key: str, where: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is not default and not isinstance(value, str):
        raise SuiteError(f"{where}: {key} must be a string, got {type(value).__name__} {value!r}")
    return value


def pipeline(raw: Any, where: str, base: dict[str, Any]) -> dict[str, Any]:
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


def check_sweep(pipeline: dict[str, Any], reward: str, where: str) -> None:
    """Sweeping the feedback (pairs, tau) only changes a learned reward: elsewhere it makes identical cells."""
    swept = [k for k in ("pairs", "tau") if isinstance(pipeline[k], list) and len(pipeline[k]) > 1]
    if swept and reward != LEARNED:
        raise SuiteError(
            f"{where}: pipeline.{swept[0]} sweeps {pipeline[swept[0]]} but the task's reward is {reward!r}: "
            f"{' and '.join(swept)} only shape a learned reward, so every entry would run the same cells; "
            'give one value, or set reward = "learned"'
        )


def reward(raw: dict, where: str, default: str) -> str:
    value = raw.get("reward", default)
    if not isinstance(value, str) or not value.strip():
        raise SuiteError(
            f"{where}: reward must be gold, learned, a registered reward or a reward model folder, got {value!r}"
        )
    return value


def chat_template(raw: dict, where: str, default: str) -> str:
    from rlhf_env.prompt_format import CHAT_TEMPLATE_MODES

    value = raw.get("chat_template", default)
    if value not in CHAT_TEMPLATE_MODES:
        raise SuiteError(f"{where}: chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {value!r}")
    return value


def model_exists(model: str) -> bool:
    from rlhf_env import gguf

    if gguf.is_package_ref(model):
        return gguf.packaged(model[len(gguf.PACKAGE_PREFIX) :]) is not None
    path = Path(model).expanduser()
    return path.is_file() if gguf.is_gguf(model) else path.is_dir()


# The keys of a ``lora`` table: rlhf train's --lora-rank, --lora-alpha, --lora-dropout, --lora-target-modules.
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def lora(raw: dict, where: str, default: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``lora`` table (``{ rank = 16, alpha = 32 }``) as ``LoraSettings.as_dict()``; ``false``: full fine-tuning.

    A task's table replaces the top-level one whole. PEFT must be installed (the ``lora`` extra).
    """
    if "lora" not in raw:
        return default
    value = raw["lora"]
    if value is False:
        return None
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: lora must be a table like {{ rank = 16, alpha = 32 }}, or false, got {value!r}")
    bad = sorted(set(value) - set(LORA_KEYS))
    if bad:
        raise SuiteError(f"{where}: unknown lora keys {bad}; known: {list(LORA_KEYS)}")
    rank, alpha, dropout = value.get("rank"), value.get("alpha"), value.get("dropout", 0.0)
    targets = value.get("target_modules")
    if rank is None:
        raise SuiteError(f"{where}: lora needs a rank (lora = {{ rank = 16 }})")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise SuiteError(f"{where}: lora.rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and not (_number(alpha) and alpha > 0):
        raise SuiteError(f"{where}: lora.alpha must be a number > 0 (default 2 × rank), got {alpha!r}")
    if not (_number(dropout) and 0 <= dropout < 1):
        raise SuiteError(f"{where}: lora.dropout must be a number in [0, 1), got {dropout!r}")
    names = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if targets is not None and not names:
        raise SuiteError(
            f'{where}: lora.target_modules must be a non-empty list of module names, like ["c_attn"], got {targets!r}'
        )
    from rlhf_env.algorithms.scale.lora import LoraSettings
    from rlhf_env.errors import MissingExtraError

    alpha = None if alpha is None else float(alpha)
    try:
        settings = LoraSettings(rank, alpha, float(dropout), tuple(targets) if targets else None)
    except MissingExtraError:
        raise SuiteError(f"{where}: lora needs PEFT, which is not installed: pip install 'rlhf_env[lora]'") from None
    return settings.as_dict()
