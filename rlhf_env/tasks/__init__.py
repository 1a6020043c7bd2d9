"""Embedded tasks with gold rewards, simulated annotators, user data, and base models.

Tasks are found through the plugin registry (``get_task``), like any plugin's.
"""

from __future__ import annotations

from typing import Any

from rlhf_env.tasks.base import BaseModelRecipe, PreferencePair, Task


def get_task(name: str, **knobs: Any) -> Task:
    """Build the registered task ``name`` with its knobs (unknown names list the known ones)."""
    import plugins

    return plugins.get_host().tasks.get(name)(**knobs)


def evaluate(task: Task, model, tokenizer, *, n: int | None = None, greedy: bool = False, seed: int = 0) -> dict:
    """Mean gold reward of the model's completions of the eval prompts (sampled at T=1 by default)."""
    from rlhf_env.policy import sample_completions

    prompts = task.eval_prompts[:n]
    completions = sample_completions(model, tokenizer, prompts, task.max_new_tokens, greedy=greedy, seed=seed)
    gold = task.gold_reward(prompts, completions)
    return {"gold_mean": sum(gold) / len(gold), "n": len(gold), "examples": list(zip(prompts[:3], completions[:3]))}


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
