"""REINFORCE++ (Hu 2025) and REINFORCE++-baseline: PPO's clipped update without a critic.

The KL to the reference is in the reward, per token (the env's KL-shaped reward,
docs/maths.md §2): r_t = −β k1_t, plus the score on the last token. Each token's
advantage is its return-to-go (γ = 1), normalised over every completion token of the
global batch (not per prompt, which Hu argues over-fits easy prompts):

    G_{i,t} = Σ_{s ≥ t} r_{i,s} − b_i,   Â_{i,t} = (G_{i,t} − mean_batch G) / std_batch G

with b_i = 0 (REINFORCE++) or the mean score of completion i's group (REINFORCE++-baseline,
G ≥ 2 completions a prompt). The loss is PPO's clipped surrogate, averaged over the
minibatch's tokens. The formulas: docs/maths.md §15.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlhf_env.algorithms import maths
from rlhf_env.algorithms.base import BatchShape, TrainContext, collect_rollouts, policy_logprobs, rollout_metrics
from rlhf_env.algorithms.maths import gae, masked_whiten, token_mean
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Means, Optimizer, Stateful, check_optimizer_settings, weighted_minibatches
from rlhf_env.errors import SettingError


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-6}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-5}
    num_prompts: int = 64  # prompts per iteration; the batch is num_prompts × group_size completions
    group_size: int = 1  # completions per prompt
    lr: float = 3e-4
    kl_coef: float = 0.05  # β of the per-token KL in the env reward
    clip_eps: float = 0.2
    num_iterations: int = 1  # epochs over each batch
    num_minibatches: int = 2  # optimizer steps per epoch; must divide num_prompts × group_size
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """A minibatch of num_prompts × group_size / num_minibatches rows; the ranks split the prompts."""
        batch = self.num_prompts * self.group_size
        return BatchShape(batch // self.num_minibatches, batch, "num_prompts")

    def __post_init__(self):
        if self.num_prompts < 1 or self.group_size < 1 or self.num_iterations < 1 or self.num_minibatches < 1:
            raise SettingError(f"num_prompts, group_size, num_iterations and num_minibatches must be >= 1: {self}")
        if (self.num_prompts * self.group_size) % self.num_minibatches:
            raise SettingError(
                f"num_minibatches={self.num_minibatches} must divide num_prompts × group_size = "
                f"{self.num_prompts * self.group_size}"
            )
        if self.kl_coef < 0:
            raise SettingError(f"kl_coef (β) must be >= 0, got {self.kl_coef}")
        if self.clip_eps <= 0:
            raise SettingError(f"clip_eps must be > 0, got {self.clip_eps}")
        check_optimizer_settings(self, "REINFORCE++")


@dataclass
class BaselineConfig(Config):
    num_prompts: int = 16
    group_size: int = 4  # the group whose mean score is the baseline

    def __post_init__(self):
        if self.group_size < 2:
            raise SettingError(
                f"REINFORCE++-baseline needs group_size >= 2 (the baseline is a group mean), got {self.group_size}"
            )
        super().__post_init__()


def no_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++: b_i = 0. scores: (B,)."""
    return torch.zeros_like(scores)


def group_mean_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE++-baseline: b_i = mean score of row i's group (rows i // G). scores: (B,)."""
    return scores.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """(B, T) returns-to-go minus the baseline, whitened over the batch's completion tokens.

    Args:
        rewards: (B, T) per-token rewards r_t (KL-shaped, score on the last token).
        mask: (B, T) 1 on completion tokens.
        baseline: (B,) b_i, subtracted from every G_{i,t}.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, gae_lambda=1.0)  # V = 0: return-to-go
    return masked_whiten((returns - baseline[:, None]) * mask, mask)


def reinforce_pp_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2, tis=None):
    """−token_mean(min(ρ_t Â_t, clip(ρ_t, 1−ε, 1+ε) Â_t)) over the minibatch's completion tokens.

    Args:
        logp: (B, T) log π_θ (with gradients); old_logp: (B, T) log π_old.
        advantages: (B, T) Â; mask: (B, T).
        tis: (B, T) truncated importance weights multiplying the surrogate (an inexact generator), or None.
    Returns:
        (loss scalar, clipfrac scalar).
    """
    surrogate, ratio = maths.clipped_surrogate(logp, old_logp, advantages, clip_eps)
    if tis is not None:
        surrogate = surrogate * tis
    clipfrac = token_mean(maths.clipped(ratio, advantages, clip_eps).to(mask.dtype), mask)
    return -token_mean(surrogate, mask), clipfrac.detach()


class Trainer(Stateful):
    """REINFORCE++: KL-shaped token rewards, batch-whitened returns-to-go, clipped minibatch updates."""

    baseline = staticmethod(no_baseline)

    def __init__(self, ctx: TrainContext, config: Config):
        self.ctx, self.config = ctx, config
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        B = c.num_prompts * c.group_size
        batch = collect_rollouts(self.ctx, self.ctx.env(B, group_size=c.group_size, beta=c.kl_coef), seed)
        advantages = reinforce_pp_advantages(
            batch.rewards, batch.action_mask, self.baseline(batch.scores, c.group_size)
        )
        means = Means()
        for part in weighted_minibatches(B, c.num_minibatches, c.num_iterations, seed, batch.input_ids.device):
            part = part.by_tokens(batch.action_mask)  # data-parallel: the loss averages over tokens
            rows = part.rows
            logp, mask = policy_logprobs(policy, batch, rows), batch.action_mask[rows]
            tis = batch.is_weights[rows] if batch.is_weights is not None else None
            loss, clipfrac = reinforce_pp_loss(logp, batch.logprobs[rows], advantages[rows], mask, c.clip_eps, tis)
            grad_norm = self.optimizer.step(loss, weight=part.weight, policy=loss)
            means.add({M.LOSS_POLICY: loss, M.POLICY_CLIPFRAC: clipfrac, M.OPTIM_GRAD_NORM: grad_norm}, part.weight)
        return {
            **means.means(),
            **rollout_metrics(batch, returns=True),
        }


class BaselineTrainer(Trainer):
    """REINFORCE++-baseline: the group's mean score subtracted before the batch whitening."""

    baseline = staticmethod(group_mean_baseline)
