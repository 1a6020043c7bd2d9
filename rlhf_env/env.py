"""``TextGenEnv``: one text-generation episode as a Gymnasium MDP.

State = prompt ∘ partial completion, action = one token (with the acting policy's
log-prob of it), reward per token ``-β (log π_θ - log π_ref)`` plus the reward score on
the last token. ``terminated`` on a stop id (EOS, the chat template's end of turn, ...),
``truncated`` at ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch

from rlhf_env import spaces
from rlhf_env.env_common import EnvProperties, load_parts
from rlhf_env.episodes import EpisodeBatch
from rlhf_env.errors import EpisodeEndedError, InvalidActionError, SettingError


def split_action(action: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``{"token", "logprob"}`` or bare tokens -> ((n,) int64 tokens, (n,) float32 log-probs or None)."""
    if isinstance(action, dict):
        if "token" not in action:
            raise InvalidActionError(f"action dict needs a 'token' key, got keys {sorted(action)}")
        tokens, logprobs = action["token"], action.get("logprob")
    else:
        tokens, logprobs = action, None
    tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise InvalidActionError(f"tokens must be integers, got dtype {tokens.dtype}")
    tokens = tokens.reshape(-1)
    if tokens.numel() != n:
        raise InvalidActionError(f"expected {n} token(s), got {tokens.numel()}")
    if logprobs is not None:
        logprobs = torch.as_tensor(logprobs, dtype=torch.float32).detach().cpu().reshape(-1)
        if logprobs.numel() != n:
            raise InvalidActionError(f"expected {n} log-prob(s), got {logprobs.numel()}")
    return tokens.cpu(), logprobs


def split_chunk_action(action: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``{"token": (n, K), "logprob": (n, K), "length": (n,)}`` or bare (n, K) tokens ->
    ((n, K) int64 tokens, (n, K) float32 log-probs or None, (n,) int64 counts in 1..K)."""
    if isinstance(action, dict):
        if "token" not in action:
            raise InvalidActionError(f"action dict needs a 'token' key, got keys {sorted(action)}")
        tokens, logprobs, counts = action["token"], action.get("logprob"), action.get("length")
    else:
        tokens, logprobs, counts = action, None, None
    tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens).cpu()
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise InvalidActionError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] != n or tokens.shape[1] < 1:
        raise InvalidActionError(f"expected tokens of shape ({n}, K) with K >= 1, got {tuple(tokens.shape)}")
    K = tokens.shape[1]
    if logprobs is not None:
        logprobs = torch.as_tensor(logprobs, dtype=torch.float32).detach().cpu()
        if logprobs.shape != tokens.shape:
            raise InvalidActionError(f"expected log-probs of shape {tuple(tokens.shape)}, got {tuple(logprobs.shape)}")
    if counts is None:
        counts = torch.full((n,), K, dtype=torch.long)
    else:
        counts = torch.as_tensor(np.asarray(counts) if not torch.is_tensor(counts) else counts).cpu().reshape(-1)
        if counts.numel() != n or bool(((counts < 1) | (counts > K)).any()):
            raise InvalidActionError(f"'length' must hold {n} counts in [1, {K}], got {counts.tolist()}")
        counts = counts.to(torch.long)
    return tokens.to(torch.long), logprobs, counts


class TextGenEnv(EnvProperties, gymnasium.Env):
    """Token-level text generation with KL-shaped rewards (docs/maths.md §2).

    Args:
        tokenizer: policy tokenizer (object or local path).
        ref_model: reference causal LM π_ref (object or local path); optional when β = 0.
        reward: ``reward(prompts, completions) -> scores``, a ``RewardModel``, or a
            sequence-classification model with one label.
        prompts: non-empty sequence of prompt strings.
        beta: KL coefficient β.
        max_new_tokens: completion length limit.
        max_prompt_tokens: prompt length limit (default: longest prompt).
        reward_tokenizer: tokenizer of a reward model whose tokenizer differs.
        device, dtype: where π_ref and r_φ run (default CUDA if available; bf16 optional).
        render_mode: ``"ansi"`` or None.
        chat_template: ``"auto"`` (default): a prompt becomes a user turn of the tokenizer's chat
            template with the generation prompt, when the tokenizer has one; ``"none"``: raw text.
            The reward sees the raw prompt and the assistant text either way.
        stop_token_ids: more ids that end an episode (``stop_token_ids`` lists them all).

    Observation: ``{"input_ids": (L,) int64, "length": int, "prompt_length": int}``.
    Action: ``{"token": int, "logprob": float}``; a bare ``int`` when β = 0.
    ``info``: ``ref_logprob``, ``kl`` (log π_θ − log π_ref) each step; ``score``,
    ``prompt`` and ``completion`` on the last.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        tokenizer,
        ref_model=None,
        reward=None,
        prompts=(),
        *,
        beta: float = 0.05,
        max_new_tokens: int = 32,
        max_prompt_tokens: int | None = None,
        reward_tokenizer=None,
        device=None,
        dtype: torch.dtype | None = None,
        render_mode: str | None = None,
        trust_remote_code: bool = False,
        chat_template: str = "auto",
        stop_token_ids=(),
    ):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise SettingError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        parts = load_parts(
            tokenizer,
            ref_model,
            reward,
            reward_tokenizer=reward_tokenizer,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        self.core = EpisodeBatch(
            *parts[:3],
            prompts,
            beta=beta,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            batch_size=1,
            device=parts[3],
            chat_template=chat_template,
            stop_token_ids=stop_token_ids,
        )
        self.observation_space = spaces.observation_space(self.core.vocab_size, self.core.max_len)
        self.action_space = spaces.action_space(self.core.vocab_size)
        self._done = True
        self._started = False

    def _obs(self) -> dict[str, Any]:
        c = self.core
        return {
            "input_ids": c.ids[0].numpy().copy(),
            "length": np.int64(c.length[0]),
            "prompt_length": np.int64(c.prompt_length[0]),
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode with ``options["prompt"]`` or a prompt drawn with the seeded RNG."""
        self._check_open("reset")
        options = self._reset_options(options, ("prompt",))
        super().reset(seed=seed)
        prompt = options["prompt"] if "prompt" in options else self.core.prompts.sample(self.np_random)
        self.core.advance(torch.zeros(1, dtype=torch.long), None, torch.zeros(1, dtype=torch.bool), {0: prompt})
        self._done, self._started = False, True
        return self._obs(), {"prompt": prompt}

    def step(self, action):
        self._check_open("step")
        if self._done:
            why = "reset() was never called" if not self._started else "the episode has ended"
            raise EpisodeEndedError(f"step() called but {why}: call reset() first")
        tokens, logprobs = split_action(action, 1)
        out = self.core.advance(tokens, logprobs, torch.ones(1, dtype=torch.bool))
        terminated, truncated = bool(out.terminated[0]), bool(out.truncated[0])
        info: dict[str, Any] = {}
        if out.ref_logprob is not None:
            info["ref_logprob"] = float(out.ref_logprob[0])
        if out.kl is not None:
            info["kl"] = float(out.kl[0])
        if terminated or truncated:
            self._done = True
            info["score"] = float(out.score[0])
            info["prompt"] = self.core.prompt_text[0]
            info["completion"] = self.core.completion_text(0)
        return self._obs(), float(out.reward[0]), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return f"{self.core.prompt_text[0]}\u2502{self.core.completion_text(0)}"
