"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, Qwen), a GRPO variant.

GRPO's advantages (group-normalised, docs/maths.md §7), but one importance ratio per
completion, the geometric mean of its token ratios, clipped per sequence:

    s_i = (π_θ(y_i|x) / π_old(y_i|x))^{1/|y_i|} = exp((1/|y_i|) Σ_t log ρ_{i,t})
    J   = (1/B) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i)  [ − β seq_mean(k3) ]

Clipping whole sequences removes the per-token ratio noise that GRPO's token ratios carry
(Zheng et al. §4). The paper's ε are tiny (3e-4, 4e-4) because s_i is a length-normalised
ratio; the defaults here are the paper's. GRPO's trainer with this loss: docs/maths.md §16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_env.algorithms.maths import (
    asymmetric_clipped_surrogate,
    check_asymmetric_clip,
    kl_k3,
    masked_mean,
    seq_mean,
    sequence_ratio,
    token_mean,
)
from rlhf_env.algorithms.zoo import grpo
from rlhf_env.algorithms.zoo.grpo import LossParts


@dataclass
class Config(grpo.GroupConfig):
    kl_coef: float = 0.0  # GSPO uses no KL penalty
    clip_eps_low: float = 3e-4  # ε_low of the sequence ratio (Zheng et al. §5.1)
    clip_eps_high: float = 4e-4  # ε_high

    def __post_init__(self):
        super().__post_init__()
        check_asymmetric_clip(self.clip_eps_low, self.clip_eps_high)


def gspo_loss(
    logp, old_logp, ref_logp, advantages, mask, eps_low=3e-4, eps_high=4e-4, kl_coef=0.0, tis=None
) -> LossParts:
    """−(1/B) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i) + β seq_mean(k3).

    Args:
        logp: (B, T) log π_θ (with gradients); old_logp, ref_logp: (B, T).
        advantages: (B,) Â_i; mask: (B, T) 1 on completion tokens.
        tis: (B, T) truncated importance weights w_t of an inexact generator, or None; sequence i's
            surrogate is then weighted by their geometric mean exp((1/|y_i|) Σ_t log w_t), as s_i is
            the geometric mean of the token ratios (docs/maths.md §16).
    Returns:
        ``LossParts``; clipfrac is the share of completion tokens in clipped sequences.
    """
    s = sequence_ratio(logp, old_logp, mask)
    surrogate, clipped = asymmetric_clipped_surrogate(s, advantages, eps_low, eps_high)
    # An all-padding row has s = exp(0) = 1, so s Â would count Â in the loss's value (not its
    # gradient); it contributes 0, as in GRPO and TRL.
    surrogate = surrogate * (mask.sum(dim=1) > 0).to(surrogate.dtype)
    if tis is not None:  # off the mask w = 0: clamp before the log, the mask drops those entries
        surrogate = surrogate * torch.exp(masked_mean(torch.log(tis.clamp(min=1e-30)), mask, dim=1))
    policy = -surrogate.mean()
    kl = kl_coef * seq_mean(kl_k3(logp, ref_logp), mask)
    clipfrac = token_mean(clipped[:, None].to(mask.dtype).expand_as(mask), mask)
    return LossParts(policy + kl, policy, kl, clipfrac.detach())


class Trainer(grpo.Trainer):
    """GRPO's sampling, advantages and minibatches; GSPO's sequence-level clipped loss."""

    def loss(self, logp, old_logp, ref_logp, advantages, mask, tis=None) -> LossParts:
        c = self.config
        return gspo_loss(logp, old_logp, ref_logp, advantages, mask, c.clip_eps_low, c.clip_eps_high, c.kl_coef, tis)
