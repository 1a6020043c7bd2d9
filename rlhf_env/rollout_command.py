"""What ``rlhf rollout`` runs: the embedded or a task's vector env, the reference as policy, through the rollout path."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from rlhf_env.generation import DEFAULT_GENERATOR, make_sampler
from rlhf_env.rollout import Episode, EpisodeStream, env_attr


@dataclass
class RolloutResult:
    """What ``rlhf rollout`` prints: the finished episodes and the generation rate."""

    episodes: list[Episode]
    tokens: int  # tokens the policy generated (acting rows over all steps)
    seconds: float


def run_rollout(
    episodes: int = 8,
    num_envs: int = 4,
    max_new_tokens: int | None = None,
    beta: float = 0.05,
    seed: int = 0,
    task: str | None = None,
    model: str | None = None,
    dtype=None,
    generator: str = DEFAULT_GENERATOR,
    chat_template: str = "auto",
) -> RolloutResult:
    """Roll a vector env with the reference as policy until ``episodes`` end (``rlhf rollout``).

    The env is ``task``'s (its base model, or ``model``), else the embedded default's prompts
    and reward with ``model`` (default: the embedded tiny model). ``dtype``: the weights'
    torch dtype (log-probs are float32 whatever it is). ``chat_template``: ``"auto"`` (the
    tokenizer's template when it has one) or ``"none"`` (raw prompt text).
    """
    limit = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    if task is None:
        from rlhf_env.default import make_default_vector_env
        from rlhf_env.models import load_pretrained

        parts = {}
        if model is not None:
            ref, tokenizer = load_pretrained(model, device="cpu")
            parts = {"tokenizer": tokenizer, "ref_model": ref}
        limit = {"max_new_tokens": 24, **limit}
        env = make_default_vector_env(
            num_envs=num_envs, beta=beta, dtype=dtype, chat_template=chat_template, **parts, **limit
        )
    else:
        from rlhf_env.tasks import make_task_env, task_from_spec

        kwargs = dict(num_envs=num_envs, beta=beta, device="cpu", dtype=dtype, chat_template=chat_template, **limit)
        env = make_task_env(task_from_spec(task, max_new_tokens=max_new_tokens), model, **kwargs)
    # In RLHF the policy starts as a copy of the reference, so the KL starts at zero.
    policy = copy.deepcopy(env_attr(env, "ref_model"))
    pad, vocab = env_attr(env, "pad_token_id"), env_attr(env, "vocab_size")
    stops = env_attr(env, "stop_token_ids")
    sampler = make_sampler(
        generator, policy, num_envs, pad_token_id=pad, vocab_size=vocab, seed=seed, stop_token_ids=stops
    )
    stream = EpisodeStream(env, sampler, seed)
    finished: list[Episode] = []
    start = time.perf_counter()
    for ep in stream:
        finished.append(ep)
        if len(finished) >= episodes:
            break
    seconds = time.perf_counter() - start
    env.close()
    return RolloutResult(finished, stream.tokens, seconds)
