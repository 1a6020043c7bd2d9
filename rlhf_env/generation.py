"""The generation seam: how the rollout path gets tokens from a policy model.

A *generator* is a factory registered through the ``rlhf_register_generators`` hook; the
rollout path (``rlhf_env.rollout``) builds one sampler per rollout from it, by name, and
calls ``act`` once per env step. The built-in ``kv_cache`` is ``SamplingPolicy`` (the
policy's own KV cache, one batched forward per step). A faster backend is a plugin that
registers another name; it may generate whole completions when it first sees a prompt and
hand them out token by token, as long as the log-probs are those of what it sampled.

A sampler with ``generate(obs, max_tokens)`` (whole completions as a ``step_chunk`` action)
serves the chunked rollout path: one generation and one reference pass per rollout. The
built-in ``hf_generate`` wraps Hugging Face ``generate``. A generator whose log-probs are
those of a full forward of the policy sets ``exact_logprobs = True``; for the others the
trainer recomputes them (``rollout/logprob_diff``) and corrects with truncated importance
sampling (``rlhf_env.algorithms.maths.truncated_is_weights``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

DEFAULT_GENERATOR = "kv_cache"


class Sampler(Protocol):
    def act(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """One token per row from a vector-env observation (the token path; see also ``generate``).

        ``obs``: ``input_ids`` (B, L) int64 prompt ∘ completion ids, right-padded with
        ``pad_token_id``; ``length`` (B,) and ``prompt_length`` (B,); a row with
        ``length == prompt_length`` has just started an episode on a new prompt.
        Returns ``{"token": (B,) int64 in [0, vocab_size), "logprob": (B,) float32}``, the
        log-prob of each token under the distribution it was drawn from (≤ 0).
        """


class Generator(Protocol):
    def __call__(
        self,
        model,
        batch_size: int,
        *,
        pad_token_id: int,
        vocab_size: int,
        seed: int,
        temperature: float = 1.0,
        greedy: bool = False,
        stop_token_ids: Sequence[int] | None = None,
    ) -> Sampler:
        """A sampler for ``batch_size`` env rows from the causal LM ``model``, seeded with ``seed``.

        ``stop_token_ids`` (optional to accept): the env's ids that end an episode (EOS, the chat
        template's end of turn, ...), where a whole-completion ``generate`` should stop.
        ``make_sampler`` passes it only to generators whose signature takes it.
        """


def exact_logprobs(name: str) -> bool:
    """Whether generator ``name`` promises the log-probs of a full forward of the policy (its
    ``exact_logprobs`` attribute; False when it does not say). Trainers recompute them otherwise."""
    from rlhf_env import plugins

    return bool(getattr(plugins.get_host().generators.get(name), "exact_logprobs", False))


def _takes(factory, name: str) -> bool:
    """Whether ``factory`` accepts keyword ``name`` (declared, or through ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: do not risk an unexpected keyword
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def make_sampler(
    name: str, model, batch_size: int, *, stop_token_ids: Sequence[int] | None = None, **kwargs: Any
) -> Sampler:
    """The registered generator ``name`` (unknown names list the registered ones) built for one rollout.

    ``stop_token_ids`` (the env's) reach generators that take them; one that does not stops as
    it likes, and the env still ends episodes on its own stop ids.
    """
    from rlhf_env import plugins

    factory = plugins.get_host().generators.get(name)
    if stop_token_ids is not None and _takes(factory, "stop_token_ids"):
        kwargs["stop_token_ids"] = tuple(stop_token_ids)
    return factory(model, batch_size, **kwargs)
