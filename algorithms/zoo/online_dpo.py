"""Online DPO (Guo et al., 2024, "Direct language model alignment from online AI feedback").

Each step the *current* policy completes every prompt twice; the task's reward (the env's
reward: the gold reward unless the task or suite chose another) ranks the two samples, the
higher one is chosen, and the DPO loss (docs/maths.md §9) is taken on those fresh pairs
against the frozen reference:

    L = −mean log σ(β[(log π_θ(y+|x) − log π_ref(y+|x)) − (log π_θ(y−|x) − log π_ref(y−|x))])

A prompt whose two samples score the same carries no preference and is left out of the
loss; a step where every prompt ties makes no update. log π_ref comes from the env, which
scores every sampled token under the reference anyway. The formulas: docs/maths.md §22.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlhf_env.algorithms.base import BatchShape, collect_rollouts, policy_logprobs, rollout_metrics
from rlhf_env.algorithms.maths import masked_sum
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import PolicyTrainer, check_optimizer_settings
from rlhf_env.algorithms.zoo.dpo import dpo_loss, pair_metrics
from rlhf_env.errors import SettingError


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-6}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-5}
    num_prompts: int = 32  # prompts per step; each is completed twice by the current policy
    beta: float = 1.0  # β of the DPO loss (short completions want a large β)
    lr: float = 3e-4
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """Two samples a prompt, their pair in one forward; the ranks split the prompts."""
        return BatchShape(2 * self.num_prompts, 2 * self.num_prompts, "num_prompts")

    def __post_init__(self):
        if self.num_prompts < 1:
            raise SettingError(f"online DPO num_prompts must be >= 1, got {self.num_prompts}")
        if not self.beta > 0:
            raise SettingError(f"online DPO beta must be > 0, got {self.beta}")
        check_optimizer_settings(self, "online DPO")


def rank_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rows of the pairs that carry a preference (docs/maths.md §22).

    Args:
        scores: (2P,) rewards, rows 2p and 2p+1 the two samples of prompt p.
    Returns:
        ``(chosen, rejected)``: (K,) row indices, K ≤ P, one per prompt whose two scores differ.
    """
    if scores.dim() != 1 or scores.numel() % 2:
        raise ValueError(f"scores must be (2P,) two samples per prompt, got {tuple(scores.shape)}")
    pair = scores.view(-1, 2)
    keep = torch.nonzero(pair[:, 0] != pair[:, 1]).squeeze(1)
    first_wins = (pair[keep, 0] > pair[keep, 1]).long()
    chosen = 2 * keep + 1 - first_wins
    return chosen, 2 * keep + first_wins


class Trainer(PolicyTrainer):
    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        # β = 0 in the env: the scores are the task's reward; the KL lives in the DPO loss.
        batch = collect_rollouts(self.ctx, self.ctx.env(2 * c.num_prompts, group_size=2, beta=0.0), seed)
        chosen, rejected = rank_pairs(batch.scores)
        metrics = {
            # The DPO loss does not use the sampler's log-probs: a mismatch is reported, nothing to correct.
            **rollout_metrics(batch),
            M.ONLINE_DPO_PAIR_FRACTION: len(chosen) / c.num_prompts,
        }
        if len(chosen) == 0:  # every prompt tied: nothing to prefer
            return metrics
        rows = torch.cat([chosen, rejected])
        mask = batch.action_mask[rows]
        logp = masked_sum(policy_logprobs(policy, batch, rows), mask, 1)
        ref = masked_sum(batch.ref_logprobs[rows], mask, 1)
        k = len(chosen)
        loss, chosen_r, rejected_r = dpo_loss(logp[:k], logp[k:], ref[:k], ref[k:], c.beta)
        grad_norm = self.optimizer.step(loss, policy=loss)
        return {
            **metrics,
            **pair_metrics(loss, grad_norm, chosen_r, rejected_r),
            M.DPO_CHOSEN_REWARD: chosen_r.mean().item(),
            M.DPO_REJECTED_REWARD: rejected_r.mean().item(),
        }
