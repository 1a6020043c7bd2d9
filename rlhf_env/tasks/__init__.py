"""Embedded tasks with gold rewards, simulated annotators, user data, and base models.

Tasks are found through the plugin registry (``get_task``), like any plugin's.
"""

from __future__ import annotations

from typing import Any

from rlhf_env.errors import SettingError
from rlhf_env.tasks.base import BaseModelRecipe, PreferencePair, Task

# A knob every task takes: the completion length limit. A factory with its own ``max_new_tokens``
# (sentiment: its corpus is cut to fit) gets it; for the others ``get_task`` sets ``Task.max_new_tokens``.
UNIVERSAL_KNOBS = {"max_new_tokens": int}


def get_task(name: str, **knobs: Any) -> Task:
    """Build the registered task ``name`` with its knobs (unknown names list the known ones).

    ``max_new_tokens`` is accepted by every task (``UNIVERSAL_KNOBS``): recorded in ``Task.config``
    (so a run saves it and ``--resume`` restores it) but not in the base model's cache key.
    """
    from dataclasses import replace

    from rlhf_env import plugins
    from rlhf_env.typed import signature_types

    factory = plugins.get_host().tasks.get(name)
    takes = signature_types(factory)
    extra = {k: knobs.pop(k) for k in list(knobs) if k in UNIVERSAL_KNOBS and takes is not None and k not in takes}
    task = factory(**knobs)
    if "max_new_tokens" in extra:
        n = extra["max_new_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SettingError(f"task {name!r}: max_new_tokens must be an integer >= 1, got {n!r}")
        config = {**task.config, "max_new_tokens": n}
        task = replace(task, max_new_tokens=n, config=config, unkeyed=(*task.unkeyed, "max_new_tokens"))
    return task


def task_knob_types(name: str) -> dict[str, Any] | None:
    """``{knob: type}`` task ``name`` takes (its factory's parameters and ``UNIVERSAL_KNOBS``); None: ``**kwargs``."""
    from rlhf_env import plugins
    from rlhf_env.typed import signature_types

    takes = signature_types(plugins.get_host().tasks.get(name))
    return None if takes is None else {**UNIVERSAL_KNOBS, **takes}


def parse_task_spec(text: str) -> tuple[str, dict[str, str]]:
    """``"arithmetic:digits=1,operators=+-"`` -> ``("arithmetic", {"digits": "1", "operators": "+-"})``.

    Values are text (``typed_task_knobs`` types them). A first piece without ``=`` is the value of
    the factory's first parameter (key ``""``): ``reasoning_gym:basic_arithmetic``,
    ``prompt_file:qa.jsonl``. A later piece without ``=`` continues the value before it, so a list
    knob reads naturally: ``sentiment:mix=1,0,0,0``.
    """
    name, _, options = text.partition(":")
    name = name.strip()
    if not name:
        raise SettingError(f"--task expects NAME or NAME:KEY=VALUE,..., got {text!r}")
    knobs: dict[str, str] = {}
    last = None
    for piece in options.split(",") if options.strip() else []:
        key, sep, value = piece.partition("=")
        if sep and key.strip():
            last = key.strip()
            if last in knobs:
                raise SettingError(f"--task {text!r}: knob {last} is given twice")
            knobs[last] = value
        elif last is not None:
            knobs[last] += "," + piece
        elif not knobs and piece.strip():
            last = ""
            knobs[""] = piece.strip()
        else:
            raise SettingError(f"--task {text!r}: knobs are NAME:KEY=VALUE,KEY=VALUE, got {piece!r}")
    return name, knobs


def typed_task_knobs(name: str, raw: dict[str, Any], *, from_text: bool = True, where: str = "--task") -> dict:
    """``raw`` knobs typed as task ``name``'s factory takes them; an unknown knob lists the accepted ones."""
    types = task_knob_types(name)
    if "" in raw:  # the positional first knob
        import inspect

        from rlhf_env import plugins

        factory = plugins.get_host().tasks.get(name)
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        first = next((p.name for p in inspect.signature(factory).parameters.values() if p.kind in named), None)
        if first is None:
            raise SettingError(f"{where} {name}: a value without KEY= needs a factory with named knobs")
        if first in raw:
            raise SettingError(f"{where} {name}: knob {first} is given twice ({raw['']!r} and {raw[first]!r})")
        raw = {first: raw[""], **{k: v for k, v in raw.items() if k}}
    if types is None:  # a factory taking **kwargs checks its knobs itself
        return dict(raw)
    from rlhf_env.typed import typed_values

    return typed_values(types, raw, from_text=from_text, where=f"{where} {name}", what="knobs")


def task_from_spec(text: str, saved_knobs: dict[str, Any] | None = None, max_new_tokens: int | None = None) -> Task:
    """The task a ``--task NAME:KEY=VALUE,...`` flag names, its knobs typed from the factory's signature.

    ``saved_knobs``: a resumed run's knobs (typed values), which the flag's own knobs override.
    ``max_new_tokens``: the ``--max-new-tokens`` flag, the same as the knob (both: they must agree).
    """
    name, raw = parse_task_spec(text)
    knobs = typed_task_knobs(name, raw)
    if max_new_tokens is not None:
        if knobs.get("max_new_tokens", max_new_tokens) != max_new_tokens:
            raise SettingError(
                f"--max-new-tokens {max_new_tokens} and --task knob max_new_tokens={knobs['max_new_tokens']} disagree"
            )
        knobs["max_new_tokens"] = max_new_tokens
    if saved_knobs:
        types = task_knob_types(name)
        kept = {k: v for k, v in saved_knobs.items() if types is None or k in types}
        knobs = {**kept, **knobs}
    return get_task(name, **knobs)


def evaluate(
    task: Task,
    model,
    tokenizer,
    *,
    n: int | None = None,
    greedy: bool = False,
    seed: int | None = None,
    chat_template: str = "auto",
) -> dict:
    """Mean gold reward of ``model``'s completions of the first ``n`` eval prompts, through the rollout path.

    Prompts are encoded as ``chat_template`` says (``rlhf_env.prompt_format``: ``"auto"``, the tokenizer's
    chat template when it has one, or ``"none"``), as a run's eval env with the same mode encodes them.

    The defaults are "base-model gold" (``rlhf_env.rollout``): sampled at temperature 1, the first
    ``EVAL_PROMPTS`` eval prompts, ``EVAL_SEED``; the number the bench's base row and
    ``evaluate_policy`` give for the same model and ``n``. Returns ``gold_mean``, ``kl_mean``
    (0 here: the model is its own reference), ``n`` and three ``examples``.
    """
    from rlhf_env.multiturn_env import MultiTurnVectorEnv
    from rlhf_env.rollout import EVAL_PROMPTS, EVAL_SEED
    from rlhf_env.rollout import evaluate as evaluate_rollout
    from rlhf_env.vector_env import VectorTextGenEnv

    prompts = task.eval_prompts[: EVAL_PROMPTS if n is None else n]
    device = next(model.parameters()).device
    # The env the training loop evaluates in (``TrainContext.env(split="eval")``), the model as its reference.
    options = task.env_options()  # a multi-turn task's interaction and limits
    env = (MultiTurnVectorEnv if options else VectorTextGenEnv)(
        tokenizer,
        model,
        task.gold_reward,
        task.eval_prompts,
        num_envs=len(prompts),
        beta=0.0,
        max_new_tokens=task.max_new_tokens,
        device=device,
        chat_template=chat_template,
        **options,
    )
    seed = EVAL_SEED if seed is None else seed
    return evaluate_rollout(env, model, prompts, seed=seed, device=device, greedy=greedy)


def make_task_env(task: Task, model_path=None, *, num_envs: int | None = None, **env_kwargs):
    """A ``TextGenEnv`` (or ``VectorTextGenEnv`` with ``num_envs``) on the task's train prompts.

    The reference model is the task's base model (built and cached on first use) or the
    local checkpoint at ``model_path``; the reward is the gold reward. A multi-turn task's env is
    a ``MultiTurnVectorEnv`` (``num_envs`` required).
    """
    from rlhf_env import MultiTurnVectorEnv, TextGenEnv, VectorTextGenEnv
    from rlhf_env.tasks.base_models import load_base_model

    if task.interaction is not None and num_envs is None:
        raise SettingError(f"task {task.name!r} is multi-turn: its env is a vector env, pass num_envs")
    model, tokenizer = load_base_model(task, model_path, device=env_kwargs.get("device"), dtype=env_kwargs.get("dtype"))
    kwargs = {"max_new_tokens": task.max_new_tokens, **env_kwargs}
    if num_envs is None:
        return TextGenEnv(tokenizer, model, task.gold_reward, task.train_prompts, **kwargs)
    if task.interaction is not None:
        kwargs.update(task.env_options())
        return MultiTurnVectorEnv(tokenizer, model, task.gold_reward, task.train_prompts, num_envs=num_envs, **kwargs)
    return VectorTextGenEnv(tokenizer, model, task.gold_reward, task.train_prompts, num_envs=num_envs, **kwargs)


__all__ = [
    "UNIVERSAL_KNOBS",
    "BaseModelRecipe",
    "PreferencePair",
    "Task",
    "evaluate",
    "get_task",
    "make_task_env",
    "parse_task_spec",
    "task_from_spec",
    "task_knob_types",
    "typed_task_knobs",
]
