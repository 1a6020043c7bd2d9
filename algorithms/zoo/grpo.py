"""GRPO (Shao et al. 2024, DeepSeekMath) and Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero").

Each prompt is completed ``G`` times (a group). The env runs with β = 0, so the reward is
the raw score r_i; the KL to the reference lives in the loss instead. Every token of
completion i gets the same advantage

    Â_i = (r_i − mean(r_group)) / (std(r_group) + eps)          (GRPO)
    Â_i =  r_i − mean(r_group)                                   (Dr. GRPO: no std scaling)

and, with ρ_t = π_θ(y_t|s_t) / π_θold(y_t|s_t), the per-token objective is

    o_t = min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i) − β k3_t,   k3 = π_ref/π_θ − log(π_ref/π_θ) − 1.

GRPO averages o_t over each completion's tokens (1/|y_i|), then over completions; Dr. GRPO
sums over tokens and divides by a constant (max_new_tokens × completions), which removes
the length bias of 1/|y_i|. The objective is maximised: the loss minimised is its negative.

The two variants are two registered algorithms sharing one trainer; they differ only in
the advantage (``scale_by_std``) and the token aggregation (``aggregate``), which are
pure functions below. The formulas: docs/maths.md §7 (and §3 for k3, §5 for the clipped
surrogate and ``policy/clipfrac``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from rlhf_env.algorithms import maths
from rlhf_env.algorithms.base import (
    BatchShape,
    RolloutBatch,
    TrainContext,
    collect_rollouts,
    policy_logprobs,
    rollout_metrics,
)
from rlhf_env.algorithms.maths import group_std, kl_k3, masked_mean
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Means, Optimizer, Stateful, check_optimizer_settings, weighted_minibatches
from rlhf_env.errors import SettingError


@dataclass
class GroupConfig:
    """The knobs of every group-relative trainer (GRPO and its variants); each adds its own clipping."""

    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-6}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-5}

    num_prompts: int = 16  # prompts per iteration; the batch is num_prompts × group_size completions
    group_size: int = 8  # G completions per prompt
    lr: float = 3e-4
    kl_coef: float = 0.04  # β of the k3 KL penalty in the loss
    num_iterations: int = 1  # inner epochs over each batch (1: on-policy, ρ = 1)
    num_minibatches: int = 4  # optimizer steps per epoch; must divide num_prompts × group_size
    max_grad_norm: float = 1.0
    std_eps: float = 1e-4  # added to the group std before dividing (GRPO only); > 0 keeps equal-reward groups at 0

    def batch_shape(self) -> BatchShape:
        """A minibatch of num_prompts × group_size / num_minibatches rows; the ranks split the prompts."""
        batch = self.num_prompts * self.group_size
        return BatchShape(batch // self.num_minibatches, batch, "num_prompts")

    def __post_init__(self):
        if self.group_size < 2:
            raise SettingError(
                f"GRPO needs group_size >= 2 (advantages are relative to a group), got {self.group_size}"
            )
        if self.kl_coef < 0:
            raise SettingError(f"kl_coef (β) must be >= 0, got {self.kl_coef}")
        if self.num_prompts < 1 or self.num_iterations < 1 or self.num_minibatches < 1:
            raise SettingError(f"num_prompts, num_iterations and num_minibatches must be >= 1: {self}")
        if (self.num_prompts * self.group_size) % self.num_minibatches:
            raise SettingError(
                f"num_minibatches={self.num_minibatches} must divide num_prompts × group_size = "
                f"{self.num_prompts * self.group_size}"
            )
        check_optimizer_settings(self, "GRPO")
        if not self.std_eps > 0:
            raise SettingError(f"std_eps must be > 0, got {self.std_eps}")


@dataclass
class Config(GroupConfig):
    """GRPO's config: the group knobs and the symmetric clip ε (GSPO, CISPO and DAPO have their own bounds)."""

    clip_eps: float = 0.2  # ε of the clipped ratio

    def __post_init__(self):
        super().__post_init__()
        if self.clip_eps <= 0:
            raise SettingError(f"clip_eps must be > 0, got {self.clip_eps}")


@dataclass
class DrConfig(Config):
    """Dr. GRPO's config: the same knobs and defaults (its loss is smaller than GRPO's, but
    Adam's update is nearly scale-free, so the same learning rate suits both)."""


# -- advantages ------------------------------------------------------------------------------


def group_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """(B,) advantages relative to the group: r_i − mean, divided by (std + eps) if ``scale_by_std``.

    The formulas: docs/maths.md §7.

    The std is the sample std (n−1), as ``torch.std`` and the common GRPO implementations
    compute it. With ``eps`` > 0 a group whose rewards are all equal gets 0 for every member
    (no NaN, and no blown-up rounding noise: mean(0.1, 0.1, 0.1) ≠ 0.1 in floating point).

    Args:
        scores: (B,) rewards, row i in group i // ``group_size``; B a multiple of it.
    """
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be (B,) with B a multiple of group_size={group_size}, got {tuple(scores.shape)}")
    grouped = scores.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (group_std(scores, group_size)[:, None] + eps)
    return adv.reshape(-1)


# -- losses ------------------------------------------------------------------------------------


class LossParts(NamedTuple):
    """The loss minimised and its parts: ``loss = policy + kl``."""

    loss: torch.Tensor  # scalar, −objective
    policy: torch.Tensor  # scalar, −(aggregated clipped surrogate)
    kl: torch.Tensor  # scalar, β·(aggregated k3)
    clipfrac: torch.Tensor  # scalar, share of completion tokens where clipping changed the objective


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float):
    """Per-token surrogate with one advantage per completion (B,) broadcast over its tokens.

    Returns:
        (surrogate (B, T), clipped (B, T) bool: clipping changed the objective, ``maths.clipped``).
    """
    surrogate, ratio = maths.clipped_surrogate(logp, old_logp, advantages[:, None], clip_eps)
    return surrogate, maths.clipped(ratio, advantages[:, None], clip_eps)


def _grpo_objective(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, aggregate, tis=None) -> LossParts:
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    if tis is not None:  # truncated importance weights of a sampler that is not π_θold (maths.truncated_is_weights)
        surrogate = surrogate * tis
    policy = -aggregate(surrogate, mask)
    kl = kl_coef * aggregate(kl_k3(logp, ref_logp), mask)
    clipfrac = masked_mean(clipped.to(mask.dtype), mask)
    return LossParts(policy + kl, policy, kl, clipfrac.detach())


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    tis: torch.Tensor | None = None,
) -> LossParts:
    """GRPO loss: −(1/B) Σ_i (1/|y_i|) Σ_{t∈y_i} [min(ρ_t Â_i, clip(ρ_t) Â_i) − β k3_t].

    Args:
        logp: (B, T) log π_θ of the taken tokens (with gradients).
        old_logp: (B, T) log π_θold (sampling time); ref_logp: (B, T) log π_ref.
        advantages: (B,) per-completion advantages Â_i.
        mask: (B, T) 1 on completion tokens; padding and prompt positions never count.
        tis: (B, T) truncated importance weights w_t multiplying the surrogate, or None.
    """
    return _grpo_objective(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, maths.seq_mean, tis)


def dr_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    tis: torch.Tensor | None = None,
) -> LossParts:
    """Dr. GRPO loss: −(1/(N·B)) Σ_i Σ_{t∈y_i} [min(ρ_t Â_i, clip(ρ_t) Â_i) − β k3_t], N = max_new_tokens.

    Same shapes as ``grpo_loss``; the advantages are expected without std scaling.
    """

    def aggregate(x, m):
        return maths.seq_sum_norm(x, m, max_new_tokens)

    return _grpo_objective(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, aggregate, tis)


# -- trainer -----------------------------------------------------------------------------------


class Trainer(Stateful):
    """GRPO: sample groups, compute group advantages, then epochs of clipped minibatch updates."""

    scale_by_std = True  # GRPO divides the advantage by the group's std
    token_level = False  # the loss averages over completions (True: over the minibatch's tokens)

    def __init__(self, ctx: TrainContext, config: Config):
        self.ctx, self.config = ctx, config
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)

    def loss(self, logp, old_logp, ref_logp, advantages, mask, tis=None) -> LossParts:
        c = self.config
        return grpo_loss(logp, old_logp, ref_logp, advantages, mask, c.clip_eps, c.kl_coef, tis)

    def rollout(self, seed: int) -> tuple[RolloutBatch, torch.Tensor, dict[str, float]]:
        """The batch to train on, its (B,) advantages and extra metrics (DAPO overrides this)."""
        c = self.config
        # β = 0 in the env: the rewards are raw scores; ref log-probs still come back.
        env = self.ctx.env(c.num_prompts * c.group_size, group_size=c.group_size, beta=0.0)
        batch = collect_rollouts(self.ctx, env, seed)
        return batch, group_advantages(batch.scores, c.group_size, self.scale_by_std, c.std_eps), {}

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        batch, advantages, extra = self.rollout(seed)
        B = len(batch.scores)
        means = Means()
        for part in weighted_minibatches(B, min(c.num_minibatches, B), c.num_iterations, seed, batch.input_ids.device):
            if self.token_level:
                part = part.by_tokens(batch.action_mask)  # data-parallel: weigh this rank's tokens
            rows = part.rows
            logp, mask = policy_logprobs(policy, batch, rows), batch.action_mask[rows]
            args = (logp, batch.logprobs[rows], batch.ref_logprobs[rows], advantages[rows], mask)
            # The contract of ``loss``: it takes ``tis``, None or the (B, T) truncated importance weights of
            # a sampler that is not π_θold; an override without it fails here, never drops the weights.
            parts = self.loss(*args, tis=None if batch.is_weights is None else batch.is_weights[rows])
            grad_norm = self.optimizer.step(parts.loss, weight=part.weight, policy=parts.policy, kl=parts.kl)
            means.add(
                {
                    M.LOSS_TOTAL: parts.loss,
                    M.LOSS_POLICY: parts.policy,
                    M.LOSS_KL: parts.kl,
                    M.POLICY_CLIPFRAC: parts.clipfrac,
                    M.OPTIM_GRAD_NORM: grad_norm,
                },
                weight=part.weight,
            )
        return {
            **means.means(),
            **extra,
            **rollout_metrics(batch, group_size=c.group_size),
        }


class DrTrainer(Trainer):
    """Dr. GRPO: no std scaling of the advantage; tokens summed and divided by the constant
    max_new_tokens × (completions in the minibatch)."""

    scale_by_std = False

    def loss(self, logp, old_logp, ref_logp, advantages, mask, tis=None) -> LossParts:
        c = self.config
        return dr_grpo_loss(
            logp, old_logp, ref_logp, advantages, mask, self.ctx.task.max_new_tokens, c.clip_eps, c.kl_coef, tis
        )
