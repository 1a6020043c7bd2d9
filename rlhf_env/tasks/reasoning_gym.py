"""``reasoning_gym``: any of reasoning-gym's procedural datasets as a task (optional extra ``reasoning``).

``--task reasoning_gym:basic_arithmetic,size=200,max_digits=2``: the first knob names the dataset;
``size``, ``seed`` and ``eval_size`` are ours, and every other knob is a field of the dataset's own
config (typed from it; an unknown one lists them). Prompts are the entries' ``question`` with
``INSTRUCTION`` appended, asking for reasoning-gym's answer convention ``<answer>...</answer>``;
the gold is the dataset's own ``score_answer(answer, entry)`` of the text in the completion's last
answer tag (None when there is none: 0 for every dataset). Train entries come from ``seed``,
eval entries from another seed (``seed + EVAL_SEED_OFFSET``), minus any question train has, so
the two are disjoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from rlhf_env.errors import MissingExtraError, SettingError
from rlhf_env.tasks.base import BaseModelRecipe, Task
from rlhf_env.tasks.fields import bind_fields
from rlhf_env.tasks.verifiers import answer_tag

INSTRUCTION = "\n\nGive your final answer inside <answer></answer> tags."
EVAL_SEED_OFFSET = 1_000_003
OWN_KNOBS = ("dataset", "size", "seed", "eval_size", "max_new_tokens")
INSTALL = "pip install 'rlhf_env[reasoning]'"


def _reasoning_gym():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise MissingExtraError(f"the reasoning_gym task needs the reasoning-gym package: {INSTALL}") from None
    return reasoning_gym, DATASETS


def dataset_names() -> list[str]:
    """reasoning-gym's registered procedural datasets (``MissingExtraError`` when it is not installed)."""
    return sorted(_reasoning_gym()[1])


def installed_datasets() -> list[str] | None:
    """``dataset_names()``, or None when reasoning-gym is not installed (``rlhf list`` says how to install it)."""
    try:
        return dataset_names()
    except MissingExtraError:
        return None


def make_reasoning_gym_task(
    dataset: str = "", size: int = 500, seed: int = 0, eval_size: int = 50, max_new_tokens: int = 256, **config: Any
) -> Task:
    """Task of reasoning-gym dataset ``dataset`` (``size`` train entries, ``eval_size`` eval ones); see the module doc."""
    # A factory with ``**config`` gets ``--task`` text as it is: its knobs are typed here.
    size, seed, eval_size, max_new_tokens = (
        _typed(v, int, k)
        for k, v in zip(("size", "seed", "eval_size", "max_new_tokens"), (size, seed, eval_size, max_new_tokens))
    )
    rg, registry = _reasoning_gym()
    if dataset not in registry:
        close = difflib.get_close_matches(str(dataset), list(registry), n=5, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(close)}?" if close else f"one of {len(registry)}: {', '.join(sorted(registry))}"
        )
        raise SettingError(f"reasoning_gym: unknown dataset {dataset!r}; {hint}")
    own = _typed_config(dataset, registry[dataset][1], config)
    for name, value in (("size", size), ("eval_size", eval_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingError(f"reasoning_gym: {name} must be an integer >= 1, got {value!r}")
    try:
        train_ds = rg.create_dataset(dataset, **own, size=size, seed=seed)
        eval_ds = rg.create_dataset(dataset, **own, size=eval_size, seed=seed + EVAL_SEED_OFFSET)
    except (TypeError, ValueError, AssertionError) as exc:  # the dataset's own config checks
        raise SettingError(f"reasoning_gym {dataset}: {exc}") from None
    fields: dict[str, dict[str, Any]] = {}
    train = _prompts(train_ds, fields, set())
    evaluation = _prompts(eval_ds, fields, set(train))
    if not evaluation:
        raise SettingError(f"reasoning_gym {dataset}: every eval question is also a train question; raise eval_size")
    score = train_ds.score_answer

    def gold(prompts: Sequence[str], completions: Sequence[str], entry: Sequence[dict]) -> list[float]:
        return [float(score(answer_tag(c), e)) for c, e in zip(completions, entry)]

    gold.rlhf_name = f"reasoning_gym {dataset} score_answer"
    return Task(
        name="reasoning_gym",
        train_prompts=train,
        eval_prompts=evaluation,
        gold_reward=bind_fields(gold, fields, "reasoning_gym"),
        sft_data=[(p, f"<answer>{fields[p]['answer']}</answer>") for p in train],
        max_new_tokens=max_new_tokens,
        recipe=BaseModelRecipe(n_positions=512),
        config={"dataset": dataset, "size": size, "seed": seed, "eval_size": eval_size, **own}
        | {"max_new_tokens": max_new_tokens},
        fields=fields,
    )


def _prompts(ds, fields: dict[str, dict[str, Any]], exclude: set[str]) -> list[str]:
    """The entries' prompts in order, each once, none of ``exclude``; their fields added to ``fields``."""
    out = []
    for entry in ds:
        prompt = entry["question"] + INSTRUCTION
        if prompt in exclude or prompt in fields:
            continue
        fields[prompt] = {"answer": entry["answer"], "entry": entry}
        out.append(prompt)
    return out


def _typed(value: Any, tp, key: str):
    from rlhf_env.typed import ConfigError, convert

    try:
        return convert(value, tp, f"reasoning_gym {key}", from_text=isinstance(value, str))
    except ConfigError as exc:
        raise SettingError(str(exc)) from None


def _typed_config(dataset: str, config_cls, values: dict[str, Any]) -> dict[str, Any]:
    """The dataset's own knobs typed from its config dataclass (text from ``--task`` parsed)."""
    from rlhf_env.typed import config_types

    types = {k: v for k, v in config_types(config_cls).items() if k not in ("size", "seed")}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise SettingError(f"reasoning_gym {dataset}: unknown knobs {unknown}; known: {sorted([*OWN_KNOBS, *types])}")
    return {k: _typed(v, types[k], f"{dataset} {k}") for k, v in values.items()}
