"""Embedded tasks with gold rewards, simulated annotators, user data, and base models.

Tasks are found through the plugin registry (``get_task``), like any plugin's.
"""

from __future__ import annotations

from typing import Any

from rlhf_env.tasks.base import BaseModelRecipe, PreferencePair, Task


def get_task(name: str, **knobs: Any) -> Task:
    """Build the registered task ``name`` with its knobs (unknown names list the known ones)."""
    from rlhf_env import plugins

    return plugins.get_host().tasks.get(name)(**knobs)


def evaluate(
    task: Task, model, tokenizer, *, n: int | None = None, greedy: bool = False, seed: int | None = None
) -> dict:
    """Mean gold reward of ``model``'s completions of the first ``n`` eval prompts, through the rollout path.

    The defaults are "base-model gold" (``rlhf_env.rollout``): sampled at temperature 1, the first
    ``EVAL_PROMPTS`` eval prompts, ``EVAL_SEED``; the number the bench's base row and
    ``evaluate_policy`` give for the same model and ``n``. Returns ``gold_mean``, ``kl_mean``
    (0 here: the model is its own reference), ``n`` and three ``examples``.
    """
    from rlhf_env.rollout import EVAL_PROMPTS, EVAL_SEED
    from rlhf_env.rollout import evaluate as evaluate_rollout
    from rlhf_env.vector_env import VectorTextGenEnv

    prompts = task.eval_prompts[: EVAL_PROMPTS if n is None else n]
    device = next(model.parameters()).device
    # The env the training loop evaluates in (``TrainContext.env(split="eval")``), the model as its reference.
    env = VectorTextGenEnv(
        tokenizer,
        model,
        task.gold_reward,
        task.eval_prompts,
        num_envs=len(prompts),
        beta=0.0,
        max_new_tokens=task.max_new_tokens,
        device=device,
    )
    seed = EVAL_SEED if seed is None else seed
    return evaluate_rollout(env, model, prompts, seed=seed, device=device, greedy=greedy)


def make_task_env(task: Task, model_path=None, *, num_envs: int | None = None, **env_kwargs):
    """A ``TextGenEnv`` (or ``VectorTextGenEnv`` with ``num_envs``) on the task's train prompts.

    The reference model is the task's base model (built and cached on first use) or the
    local checkpoint at ``model_path``; the reward is the gold reward.
    """
    from rlhf_env import TextGenEnv, VectorTextGenEnv
    from rlhf_env.tasks.base_models import load_base_model

    model, tokenizer = load_base_model(task, model_path, device=env_kwargs.get("device"), dtype=env_kwargs.get("dtype"))
    kwargs = {"max_new_tokens": task.max_new_tokens, **env_kwargs}
    if num_envs is None:
        return TextGenEnv(tokenizer, model, task.gold_reward, task.train_prompts, **kwargs)
    return VectorTextGenEnv(tokenizer, model, task.gold_reward, task.train_prompts, num_envs=num_envs, **kwargs)


__all__ = ["BaseModelRecipe", "PreferencePair", "Task", "evaluate", "get_task", "make_task_env"]
