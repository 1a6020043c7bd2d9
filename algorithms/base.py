"""What every algorithm shares: the registered spec, the training context, rollouts.

An algorithm module defines a ``Config`` dataclass, pure loss functions, and a
``Trainer(ctx, config)`` with ``step(step) -> metrics``; it registers
``AlgorithmSpec(Config, Trainer)`` through the ``rlhf_register_algorithms`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from algorithms.overrides import typed_overrides
from rlhf_env.policy import SamplingPolicy
from rlhf_env.scoring import next_token_logprobs, pack
from rlhf_env.tasks.base import Task
from rlhf_env.vector_env import VectorTextGenEnv


@dataclass(frozen=True)
class AlgorithmSpec:
    """What a plugin registers: a config dataclass and a trainer class built from it."""

    Config: type
    Trainer: type
    description: str = ""
    trains_policy: bool = True  # False for e.g. a reward model: ``all`` in a bench suite skips it

    def make_config(self, **overrides: Any):
        """``Config(**overrides)``, each value checked against its field's type (``overrides.ConfigError``
        names the key: unknown keys list the known ones, a wrong type says the expected one)."""
        return self.Config(**typed_overrides(self.Config, overrides))


@dataclass
class TrainContext:
    """Models and data one training run works with.

    ``policy`` is trained; ``ref`` is the frozen reference (the starting policy). Both stay
    in eval mode (no dropout), so log-probs at sampling time and at training time agree.
    """

    task: Task
    policy: torch.nn.Module
    ref: torch.nn.Module
    tokenizer: Any
    device: torch.device
    seed: int = 0
    _envs: dict = field(default_factory=dict, repr=False)

    def env(self, num_envs: int, group_size: int = 1, beta: float = 0.0, split: str = "train") -> VectorTextGenEnv:
        """A vector env on the task's ``split`` prompts, the gold reward and ``ref`` (cached)."""
        key = (num_envs, group_size, beta, split)
        if key not in self._envs:
            prompts = self.task.train_prompts if split == "train" else self.task.eval_prompts
            self._envs[key] = VectorTextGenEnv(
                self.tokenizer, self.ref, self.task.gold_reward, prompts,
                num_envs=num_envs, group_size=group_size, beta=beta,
                max_new_tokens=self.task.max_new_tokens, device=self.device,
            )  # fmt: skip
        return self._envs[key]


@dataclass
class RolloutBatch:
    """One completed episode per env row, in "action" coordinates.

    Position ``t`` of the (B, L-1) tensors is the choice of token ``input_ids[:, t+1]``,
    matching ``next_token_logprobs``; ``action_mask`` is 1 on completion tokens only.
    """

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor  # (B, L) prompt ∘ completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, L-1) float
    logprobs: torch.Tensor  # (B, L-1) log π_old of the taken tokens
    ref_logprobs: torch.Tensor  # (B, L-1) log π_ref
    rewards: torch.Tensor  # (B, L-1) the env's token rewards (KL-shaped, score at the end)
    scores: torch.Tensor  # (B,) the reward at the end of each episode (gold here)
    vocab_size: int | None = None  # the tokenizer's ids: log-probs are over these (see ``token_logprobs``)

    @property
    def num_tokens(self) -> int:
        return int(self.action_mask.sum())


def collect_rollouts(ctx: TrainContext, env: VectorTextGenEnv, seed: int, prompts: list[str] | None = None) -> RolloutBatch:
    """Run the policy until every row of ``env`` has finished one episode.

    ``prompts`` (one per group) fixes the prompts, as evaluation does; else they are drawn.
    """
    B, N = env.num_envs, env.core.max_new_tokens
    agent = SamplingPolicy(ctx.policy, B, env.core.pad_token_id, seed=seed, vocab_size=env.core.vocab_size)
    obs, info = env.reset(seed=seed, options={"prompts": prompts} if prompts is not None else None)
    prompts = list(info["prompt"])
    prompt_ids = [obs["input_ids"][r, : obs["prompt_length"][r]].tolist() for r in range(B)]
    tokens = np.zeros((B, N), dtype=np.int64)
    logp, ref_logp, rewards = (np.zeros((B, N), dtype=np.float32) for _ in range(3))
    length = np.zeros(B, dtype=np.int64)
    scores = np.zeros(B, dtype=np.float32)
    completions = [""] * B
    live = np.ones(B, dtype=bool)  # still in its first episode
    while live.any():
        action = agent.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        rows = np.flatnonzero(live)
        t = length[rows]
        tokens[rows, t] = action["token"][rows]
        logp[rows, t] = action["logprob"][rows]
        ref_logp[rows, t] = info["ref_logprob"][rows]
        rewards[rows, t] = reward[rows]
        length[rows] += 1
        ended = rows[(terminated | truncated)[rows]]
        scores[ended] = info["score"][ended] if len(ended) else 0.0
        texts = env.completions()
        for r in ended:
            completions[r] = texts[r]
        live[ended] = False

    seqs = [prompt_ids[r] + tokens[r, : length[r]].tolist() for r in range(B)]
    ids, attn = pack(seqs, env.core.pad_token_id)
    L = ids.shape[1]
    shape = (B, L - 1)
    action_mask, old, ref, rew = (torch.zeros(shape) for _ in range(4))
    for r in range(B):
        start, n = len(prompt_ids[r]) - 1, int(length[r])
        action_mask[r, start : start + n] = 1
        old[r, start : start + n] = torch.from_numpy(logp[r, :n])
        ref[r, start : start + n] = torch.from_numpy(ref_logp[r, :n])
        rew[r, start : start + n] = torch.from_numpy(rewards[r, :n])
    dev = ctx.device
    return RolloutBatch(prompts, completions, ids.to(dev), attn.to(dev), action_mask.to(dev), old.to(dev),
                        ref.to(dev), rew.to(dev), torch.from_numpy(scores).to(dev), env.core.vocab_size)  # fmt: skip


def policy_logprobs(model, batch: RolloutBatch, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """(b, L-1) log-probs of the batch's tokens under ``model`` (with gradients)."""
    return next_token_logprobs(model, batch.input_ids[rows], batch.attention_mask[rows], batch.vocab_size)


@torch.no_grad()
def sequence_kl(batch: RolloutBatch) -> torch.Tensor:
    """(B,) Σ_t (log π − log π_ref) over each completion: the sampled KL to the reference (docs/maths.md §3)."""
    return ((batch.logprobs - batch.ref_logprobs) * batch.action_mask).sum(1)
