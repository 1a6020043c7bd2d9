"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to basics"; Kool et al. 2019).

Each prompt is completed k times. Completion i's return R_i is the env's KL-shaped return
(score − β Σ_t k1_t, docs/maths.md §2) and its baseline is the mean return of the *other*
k − 1 completions of its prompt, so the estimate stays unbiased (b_i does not depend on y_i):

    L = −(1/B) Σ_i (R_i − b_i) · log π_θ(y_i | x_i),   b_i = (1/(k−1)) Σ_{j≠i} R_j.

One optimizer step per rollout, on-policy, no ratio and no clipping. The formulas:
docs/maths.md §14 (and §13 for the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_env.algorithms.base import BatchShape, collect_rollouts, is_weighted, policy_logprobs, rollout_metrics
from rlhf_env.algorithms.maths import leave_one_out_baseline, masked_sum
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import PolicyTrainer, check_optimizer_settings
from rlhf_env.algorithms.zoo.reinforce import reinforce_loss
from rlhf_env.errors import SettingError


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-6}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-5}
    num_prompts: int = 16  # prompts per iteration; the batch is num_prompts × k completions
    k: int = 8  # completions per prompt (the leave-one-out group)
    lr: float = 3e-4  # 1e-3 fell below the base on some seeds and kernels (docs/maths.md §14)
    kl_coef: float = 0.05  # β of the KL-shaped env reward
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """One update on the whole batch of num_prompts × k rows; the ranks split the prompts."""
        return BatchShape(self.num_prompts * self.k, self.num_prompts * self.k, "num_prompts")

    def __post_init__(self):
        if self.k < 2:
            raise SettingError(f"RLOO needs k >= 2 (the baseline is the mean of the other k−1), got k={self.k}")
        if self.num_prompts < 1:
            raise SettingError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.kl_coef < 0:
            raise SettingError(f"kl_coef (β) must be >= 0, got {self.kl_coef}")
        check_optimizer_settings(self, "RLOO")


class Trainer(PolicyTrainer):
    """RLOO: k completions a prompt, leave-one-out baseline, one REINFORCE step per rollout."""

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        env = self.ctx.env(c.num_prompts * c.k, group_size=c.k, beta=c.kl_coef)
        batch = collect_rollouts(self.ctx, env, seed)
        returns = masked_sum(batch.rewards, batch.action_mask, 1)
        seq_logp = masked_sum(is_weighted(policy_logprobs(policy, batch), batch), batch.action_mask, 1)
        loss = reinforce_loss(seq_logp, returns, leave_one_out_baseline(returns, c.k))
        grad_norm = self.optimizer.step(loss, policy=loss)
        return {
            M.LOSS_POLICY: loss.item(),
            M.OPTIM_GRAD_NORM: grad_norm,
            **rollout_metrics(batch, group_size=c.k, returns=True),
        }
