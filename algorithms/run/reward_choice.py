"""Which reward a run optimises: ``rlhf train --reward R`` and a suite's ``reward`` key.

``R`` is one of

* ``gold``: the task's own gold reward (the default);
* a registered reward, with options: ``letter_fraction`` or ``letter_fraction:letter=a,...``
  (option values typed as the factory's parameters);
* a local reward-model folder: a Hugging Face sequence classifier with one label and its tokenizer;
* a ``reward_model`` run folder (``rlhf train --algo reward_model``): its checkpoint's r_φ;
* your own function: ``MODULE:FUNCTION`` (a dotted module importable from the current folder)
  or ``path/to/file.py:FUNCTION``, called as ``FUNCTION(prompts, completions[, fields...])``.

``A:B`` is a registered reward with options when ``A`` is a registered reward (its options always
hold ``=``); otherwise, when ``B`` is a Python identifier, it is your code. A reward that names
fields beyond ``(prompts, completions)`` (``answer``) gets the task's per-prompt fields
(``rlhf_env.tasks.fields``), checked here against the task.

The chosen reward is the *proxy*: online algorithms optimise it (``reward/score``), and the
loop scores its evaluation samples with it (``reward/proxy``) next to the gold (``reward/gold``),
which is always measured. Every bad value fails here, before any work, with a message naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_env.errors import UserError

GOLD = "gold"


class RewardChoiceError(UserError, ValueError):
    """A reward that cannot be used; the message names the value and why."""


@dataclass(frozen=True)
class RewardChoice:
    """A resolved reward: ``spec`` as runs record it, and the callable (None for gold)."""

    spec: str  # "gold", "name:key=value", or an absolute folder
    fn: Any = None  # reward(prompts, completions) -> scores; None: the task's gold

    @property
    def is_gold(self) -> bool:
        return self.fn is None


def resolve_reward(value: str | None, task, *, device=None, where: str = "reward") -> RewardChoice:
    """``value`` (see the module doc) checked against ``task`` and loaded; ``RewardChoiceError`` if unusable."""
    if value is None or value == GOLD:
        return RewardChoice(GOLD)
    if not isinstance(value, str) or not value.strip():
        raise RewardChoiceError(f"{where}: expected gold, a registered reward or a reward model folder, got {value!r}")
    if _is_users_code(value):
        return _users_code(value, task, f"{where} {value!r}")
    if _looks_like_path(value):
        return _from_folder(Path(value).expanduser().resolve(), task, device, f"{where} {value!r}")
    choice = _registered(value, f"{where} {value!r}")
    return RewardChoice(choice.spec, _bound(choice.fn, task, f"{where} {value!r}"))


def _is_users_code(value: str) -> bool:
    from rlhf_env import plugins
    from rlhf_env.user_code import is_code_ref

    return is_code_ref(value) and value.partition(":")[0] not in plugins.get_host().rewards


def _bound(fn, task, where: str):
    """``fn`` with the task's fields bound when it reads some; a field the task lacks is refused here."""
    from rlhf_env.tasks.fields import bind_fields

    try:
        return bind_fields(fn, getattr(task, "fields", None), task.name, where=where)
    except UserError as exc:
        raise RewardChoiceError(str(exc)) from None


def _users_code(value: str, task, where: str) -> RewardChoice:
    """The user's function, imported because they named it, bound to the task's fields and tried once."""
    from rlhf_env.tasks.fields import probe
    from rlhf_env.user_code import code_ref_spec, load_callable

    try:
        fn = _bound(load_callable(value, where), task, where)
        probe(fn, task.train_prompts, where)
    except RewardChoiceError:
        raise
    except UserError as exc:
        raise RewardChoiceError(str(exc)) from None
    return RewardChoice(code_ref_spec(value), fn)


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith((".", "~")) or Path(value).expanduser().exists()


def _registered(value: str, where: str) -> RewardChoice:
    from rlhf_env import plugins
    from rlhf_env.algorithms.run.overrides import ConfigError, signature_types, typed_values

    name, _, options = value.partition(":")
    registry = plugins.get_host().rewards
    if name not in registry:
        known = ", ".join(sorted(registry.names()))
        raise RewardChoiceError(
            f"{where}: unknown reward {name!r}; use gold, a registered reward ({known}), "
            "a reward model folder or a reward_model run folder"
        )
    pairs = [p for p in options.split(",") if p.strip()] if options else []
    raw = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise RewardChoiceError(f"{where}: options are NAME:KEY=VALUE,KEY=VALUE, got {pair!r}")
        raw[key.strip()] = text
    factory = registry.get(name)
    types = signature_types(factory)
    try:
        kwargs = typed_values(types, raw, from_text=True, where=where, what="options") if types is not None else raw
        fn = factory(**kwargs)
    except ConfigError as exc:
        raise RewardChoiceError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise RewardChoiceError(f"{where}: {exc}") from None
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) if kwargs else "")
    try:
        fn.rlhf_name = name  # errors it raises name it as the user chose it (``rewards.reward_name``)
    except (AttributeError, TypeError):  # a builtin or a slotted object: named by its function
        pass
    return RewardChoice(spec, fn)


def _from_folder(path: Path, task, device, where: str) -> RewardChoice:
    from rlhf_env.rewards import RewardModel

    if not path.is_dir():
        raise RewardChoiceError(f"{where}: no such folder (nor a registered reward)")
    run = _run_config(path)
    try:
        if run is not None:
            if run.get("algorithm") != "reward_model":
                raise RewardChoiceError(
                    f"{where}: {path} is a {run.get('algorithm') or 'unnamed'} run, not a reward_model run"
                )
            from rlhf_env.algorithms.zoo.reward_model import load_reward_run

            model, tok = load_reward_run(path / "checkpoint")
            rm = RewardModel(model, tok, device=device)
        else:
            rm = RewardModel(path, device=device)
    except RewardChoiceError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # ModelLoadError, VocabMismatchError, ...
        raise RewardChoiceError(f"{where}: not a reward model ({exc})") from None
    _check_encodes(rm.tokenizer, task, where)
    return RewardChoice(str(path), rm)


def _run_config(path: Path) -> dict | None:
    """The run settings in ``path/config.json`` when ``path`` is a run folder (a model's config has no algorithm)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "algorithm" in config and "model_type" not in config else None


def _check_encodes(tokenizer, task, where: str, n: int = 16) -> None:
    """The reward model's tokenizer must read the task's text: no unknown token in prompts and completions."""
    unk = tokenizer.unk_token_id
    texts = [p + c for p, c in task.sft_data[:n]] + list(task.train_prompts[:n])
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if (unk is not None and unk in ids) or not ids:
            raise RewardChoiceError(
                f"{where}: the reward model's tokenizer cannot encode task {task.name!r} "
                f"(unknown characters in {text!r})"
            )
