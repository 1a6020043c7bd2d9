"""``VectorTextGenEnv``: ``num_envs`` generation episodes stepped as one batch.

One reference forward per step through a KV cache (``IncrementalLM``), the reward scored
in one batch for the rows that end, and groups of ``group_size`` rows that share each
prompt (GRPO). Autoreset is ``NEXT_STEP``: the step after a row ends ignores that row's
action and returns the first observation of its next episode, with reward 0.
``step_chunk`` takes up to K tokens per row in one call, with the results of K steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlhf_env import spaces
from rlhf_env.env import split_action, split_chunk_action
from rlhf_env.env_common import EnvProperties, load_parts
from rlhf_env.episodes import EpisodeBatch
from rlhf_env.errors import EnvStateError, SettingError


class VectorTextGenEnv(EnvProperties, VectorEnv):
    """Batched ``TextGenEnv`` (same arguments) with ``num_envs`` rows.

    Args:
        num_envs: rows ``B``; a multiple of ``group_size``.
        group_size: ``G`` rows per prompt. Row ``i`` belongs to group ``i // G`` and the k-th
            episode of every row in a group uses the group's k-th prompt, so the G
            completions of a prompt stay together even when they end at different steps.
        (the rest as ``TextGenEnv``)

    Observations are the batched ``TextGenEnv`` observations: ``input_ids`` (B, L),
    ``length`` (B,), ``prompt_length`` (B,). Actions: ``{"token": (B,), "logprob": (B,)}``.
    ``info`` holds ``ref_logprob``/``kl`` for acting rows and ``score``, ``prompt`` and
    ``completion`` for rows that ended, each with the Gymnasium ``_key`` mask. The public
    properties (``max_new_tokens``, ``pad_token_id``, ``vocab_size``, settable ``beta``, ...)
    are ``EnvProperties``'.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        tokenizer,
        ref_model=None,
        reward=None,
        prompts=(),
        *,
        num_envs: int = 8,
        group_size: int = 1,
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
        if num_envs < 1 or group_size < 1 or num_envs % group_size:
            raise SettingError(f"num_envs={num_envs} must be a positive multiple of group_size={group_size}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise SettingError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.num_envs, self.group_size = num_envs, group_size
        self.num_groups = num_envs // group_size
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
            batch_size=num_envs,
            device=parts[3],
            chat_template=chat_template,
            stop_token_ids=stop_token_ids,
            **self._core_options(),
        )
        self.single_observation_space = spaces.observation_space(self.core.vocab_size, self.core.max_len)
        self.single_action_space = spaces.action_space(self.core.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._episode = np.zeros(num_envs, dtype=np.int64)  # per row: index of its current episode
        self._queues: list[list[str]] = []  # per group: prompts of episodes not yet finished by all
        self._queue_start = np.zeros(self.num_groups, dtype=np.int64)  # episode index of queue[0]
        self._started = False

    # -- prompts per group -------------------------------------------------------------------
    def _prompt_for(self, row: int) -> str:
        g, k = row // self.group_size, int(self._episode[row])
        queue = self._queues[g]
        while k - self._queue_start[g] >= len(queue):
            queue.append(self.core.prompts.sample(self.np_random))
        prompt = queue[k - self._queue_start[g]]
        members = self._episode[g * self.group_size : (g + 1) * self.group_size]
        while self._queue_start[g] < members.min():  # every row of the group is past it
            queue.pop(0)
            self._queue_start[g] += 1
        return prompt

    # -- gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start every row. ``options["prompts"]``: one prompt per group for the first episodes."""
        self._check_open("reset")
        options = self._reset_options(options, ("prompts",))
        super().reset(seed=seed)
        self._episode[:] = 0
        self._queue_start[:] = 0
        self._queues = [[] for _ in range(self.num_groups)]
        if "prompts" in options:
            given = list(options["prompts"])
            if len(given) != self.num_groups:
                raise SettingError(
                    f"options['prompts'] needs {self.num_groups} prompts (one per group), got {len(given)}"
                )
            self._queues = [[p] for p in given]
        restarts = {row: self._prompt_for(row) for row in range(self.num_envs)}
        B = self.num_envs
        self.core.advance(torch.zeros(B, dtype=torch.long), None, torch.zeros(B, dtype=torch.bool), restarts)
        self._autoreset[:] = False
        self._started = True
        return self._obs(), {"prompt": np.array([restarts[r] for r in range(B)], dtype=object)}

    def step(self, actions):
        self._check_open("step")
        if not self._started:
            raise EnvStateError("step() called before reset()")
        B = self.num_envs
        tokens, logprobs = split_action(actions, B)
        resetting = self._autoreset.copy()
        self._episode[resetting] += 1
        restarts = {int(r): self._prompt_for(int(r)) for r in np.flatnonzero(resetting)}
        acting = torch.from_numpy(~resetting)
        out = self.core.advance(tokens, logprobs, acting, restarts)

        terminated, truncated = out.terminated.numpy(), out.truncated.numpy()
        self._autoreset = terminated | truncated
        info: dict[str, Any] = {}
        acting_np = acting.numpy()
        if out.ref_logprob is not None:
            info["ref_logprob"], info["_ref_logprob"] = out.ref_logprob.numpy(), acting_np.copy()
        if out.kl is not None:
            info["kl"], info["_kl"] = out.kl.numpy(), acting_np.copy()
        self._end_info(info, out.score.numpy())
        self._step_info(info, out)
        return self._obs(), out.reward.numpy(), terminated, truncated, info

    def _core_options(self) -> dict[str, Any]:
        """More ``EpisodeBatch`` arguments (a subclass's: ``MultiTurnVectorEnv``'s interaction)."""
        return {}

    def _step_info(self, info: dict[str, Any], out) -> None:
        """More ``info`` of a step (a subclass's), after the single-turn keys."""

    def step_chunk(self, actions):
        """Up to K tokens per row in one call: the results of K ``step`` calls, per token.

        ``actions``: ``{"token": (B, K) int, "logprob": (B, K) float, "length": (B,) int}``
        (``length``, the tokens offered per row, 1..K, defaults to K; bare (B, K) tokens when
        β = 0). A row applies its tokens in order until an EOS or ``max_new_tokens`` ends its
        episode: **the tokens after the end are ignored** (reward 0, not checked). The call
        after a row ended is its reset step, as with ``step`` (NEXT_STEP autoreset): all its
        tokens are ignored and its next episode's first observation is returned. The
        reference scores each row's applied tokens in one forward through its KV cache.

        Returns ``obs``, ``reward`` (B, K) float32, ``terminated`` and ``truncated`` (B, K)
        bool (True at the token that ended the row), ``info`` with ``applied`` (B, K) bool,
        ``ref_logprob``/``kl`` (B, K) (masked by ``_ref_logprob``/``_kl`` = ``applied``) and, for
        rows that ended, ``score``/``prompt``/``completion`` with (B,) masks, as ``step`` gives.
        """
        self._check_open("step_chunk")
        if not self._started:
            raise EnvStateError("step_chunk() called before reset()")
        B = self.num_envs
        tokens, logprobs, counts = split_chunk_action(actions, B)
        resetting = self._autoreset.copy()
        self._episode[resetting] += 1
        restarts = {int(r): self._prompt_for(int(r)) for r in np.flatnonzero(resetting)}
        out = self.core.advance_chunk(tokens, logprobs, counts, torch.from_numpy(~resetting), restarts)
        self._autoreset = out.ended.numpy().copy()
        applied = out.applied.numpy()
        info: dict[str, Any] = {"applied": applied}
        if out.ref_logprob is not None:
            info["ref_logprob"], info["_ref_logprob"] = out.ref_logprob.numpy(), applied.copy()
        if out.kl is not None:
            info["kl"], info["_kl"] = out.kl.numpy(), applied.copy()
        self._end_info(info, out.score.numpy())
        self._step_info(info, out)
        return self._obs(), out.reward.numpy(), out.terminated.numpy(), out.truncated.numpy(), info

    def _end_info(self, info: dict[str, Any], score: np.ndarray) -> None:
        """``score``, ``prompt`` and ``completion`` of the rows that just ended, with their masks."""
        if not self._autoreset.any():
            return
        B, ended = self.num_envs, self._autoreset.copy()
        info["score"], info["_score"] = score, ended
        # The ended rows' text, as TextGenEnv gives it on the last step ("" elsewhere).
        prompt, completion = np.full(B, "", dtype=object), np.full(B, "", dtype=object)
        for r in np.flatnonzero(ended):
            prompt[r], completion[r] = self.core.prompt_text[r], self.core.completion_text(r)
        info["prompt"], info["_prompt"] = prompt, ended.copy()
        info["completion"], info["_completion"] = completion, ended.copy()

    def _obs(self) -> dict[str, np.ndarray]:
        c = self.core
        return {
            "input_ids": c.ids.numpy().copy(),
            "length": c.length.numpy().copy(),
            "prompt_length": c.prompt_length.numpy().copy(),
        }

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        c = self.core
        return tuple(f"{c.prompt_text[r]}\u2502{c.completion_text(r)}" for r in range(self.num_envs))

    def completions(self) -> list[str]:
        """Decoded completion text of every row (current or just-ended episode)."""
        return [self.core.completion_text(r) for r in range(self.num_envs)]
