"""REINFORCE (Williams 1992), the seed's policy gradient: ∇ ≈ (1/m) Σ (R(x, y) − b) ∇ log π_θ(y|x).

R is the episode's KL-shaped return from the env (score − β Σ_t KL_t); b is the batch
mean of R when ``baseline`` is on (lower variance, same expected gradient up to O(1/m)).
The formulas: docs/maths.md §2 (the return) and §8 (the estimator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlhf_env.algorithms.base import BatchShape, collect_rollouts, is_weighted, policy_logprobs, rollout_metrics
from rlhf_env.algorithms.maths import masked_sum
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import PolicyTrainer, check_optimizer_settings
from rlhf_env.errors import SettingError


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-6}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-5}
    num_envs: int = 64  # episodes per iteration (m)
    lr: float = 1e-3
    kl_coef: float = 0.05  # β of the KL-shaped env reward
    baseline: bool = True  # subtract the batch-mean return
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """One update on the num_envs rows of the rollout; the ranks split the envs."""
        return BatchShape(self.num_envs, self.num_envs, "num_envs")

    def __post_init__(self):
        check_optimizer_settings(self, "invalid REINFORCE config:")
        if self.num_envs < 1 or self.kl_coef < 0:
            raise SettingError(f"invalid REINFORCE config (need num_envs >= 1, kl_coef >= 0): {self}")


def reinforce_loss(
    seq_logprobs: torch.Tensor, returns: torch.Tensor, baseline: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """−mean((R − b) · log π(y|x)) (docs/maths.md §8).

    Args:
        seq_logprobs: (B,) log π_θ(y|x), summed over completion tokens (with gradients).
        returns: (B,) episode returns R (no gradient).
        baseline: scalar or (B,) baseline b.
    """
    return -((returns - baseline).detach() * seq_logprobs).mean()


class Trainer(PolicyTrainer):
    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        batch = collect_rollouts(self.ctx, self.ctx.env(c.num_envs, beta=c.kl_coef), seed)
        returns = masked_sum(batch.rewards, batch.action_mask, 1)
        # An inexact generator: each token's score-function term weighted by w_t (docs/maths.md §25).
        seq_logp = masked_sum(is_weighted(policy_logprobs(policy, batch), batch), batch.action_mask, 1)
        loss = reinforce_loss(seq_logp, returns, returns.mean() if c.baseline else 0.0)
        grad_norm = self.optimizer.step(loss, policy=loss)
        return {
            M.LOSS_POLICY: loss.item(),
            M.OPTIM_GRAD_NORM: grad_norm,
            **rollout_metrics(batch, returns=True),
        }
