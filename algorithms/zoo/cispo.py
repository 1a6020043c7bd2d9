"""CISPO: Clipped IS-weight Policy Optimization (MiniMax 2025, MiniMax-M1 §3.1), a GRPO variant.

GRPO's advantages (docs/maths.md §7); instead of clipping the surrogate (which drops the
gradient of clipped tokens), CISPO clips the importance weight and stops its gradient, so
every token keeps a REINFORCE gradient, with a bounded weight:

    ŵ_{i,t} = sg(clip(ρ_{i,t}, 1−ε_low, 1+ε_high))
    J       = Σ_i Σ_t ŵ_{i,t} Â_i log π_θ(y_{i,t}|s_{i,t}) / Σ_i |y_i|   [ − β token_mean(k3) ]

MiniMax sets no lower bound (ε_low large) and tunes ε_high only; the default ε_high = 5 caps
the weight at 1 + ε_high = 6, a cap against rare huge weights rather than a trust region. TRL's
``loss_type="cispo"`` caps at ε_high itself (``clamp(ρ, max=epsilon_high)``, ScaleRL's ε_max), so
its recommended ``epsilon_high=5.0`` is a cap of 5: ``clip_eps_high=4`` here. The bound is written
1 + ε_high as in MiniMax-M1 and every other clip of this library. GRPO's trainer with this loss:
docs/maths.md §17.

The default learning rate is a third of GRPO's. GRPO's clip zeroes the gradient of a token
once its ratio leaves [1−ε, 1+ε], which bounds how far the later minibatches of a batch move
the policy; CISPO keeps every token's gradient, so at GRPO's 3e-4 (4 minibatches a batch)
one-digit addition drifted (KL 2.0 nats in 60 steps) without gaining (0.39 -> 0.38); at
1e-4 it gains steadily (tests/test_grpo_variants.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_env.algorithms.maths import kl_k3, token_mean
from rlhf_env.algorithms.zoo import grpo
from rlhf_env.algorithms.zoo.grpo import LossParts
from rlhf_env.errors import SettingError


@dataclass
class Config(grpo.GroupConfig):
    lr: float = 1e-4  # a third of GRPO's: no clip stops a token's gradient (module docstring)
    kl_coef: float = 0.0  # MiniMax-M1 uses no KL penalty
    clip_eps_low: float = 1.0  # 1: no lower bound on the weight (ρ > 0), as MiniMax
    clip_eps_high: float = 5.0  # the weight's cap is 1 + ε_high = 6 (TRL's epsilon_high is the cap: 6.0)

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.clip_eps_low <= 1):
            raise SettingError(f"clip_eps_low must be in (0, 1], got {self.clip_eps_low}")
        if not self.clip_eps_high > 0:
            raise SettingError(f"clip_eps_high must be > 0, got {self.clip_eps_high}")


def cispo_loss(
    logp, old_logp, ref_logp, advantages, mask, eps_low=1.0, eps_high=5.0, kl_coef=0.0, tis=None
) -> LossParts:
    """−token_mean(sg(clip(ρ, 1−ε_low, 1+ε_high)) Â_i log π_θ) + β token_mean(k3).

    Args:
        logp: (B, T) log π_θ (with gradients); old_logp, ref_logp: (B, T).
        advantages: (B,) Â_i; mask: (B, T) 1 on completion tokens.
        tis: (B, T) truncated importance weights w_t of an inexact generator, multiplying the clipped weight; or None.
    Returns:
        ``LossParts``; clipfrac is the share of completion tokens whose weight was clipped.
    """
    ratio = (logp - old_logp).exp().detach()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    if tis is not None:
        weight = weight * tis
    policy = -token_mean(weight * advantages[:, None].detach() * logp, mask)
    kl = kl_coef * token_mean(kl_k3(logp, ref_logp), mask)
    clipfrac = token_mean(((ratio > 1 + eps_high) | (ratio < 1 - eps_low)).to(mask.dtype), mask)
    return LossParts(policy + kl, policy, kl, clipfrac)


class Trainer(grpo.Trainer):
    """GRPO's sampling, advantages and minibatches; CISPO's clipped-weight REINFORCE loss."""

    token_level = True

    def loss(self, logp, old_logp, ref_logp, advantages, mask, tis=None) -> LossParts:
        c = self.config
        return cispo_loss(logp, old_logp, ref_logp, advantages, mask, c.clip_eps_low, c.clip_eps_high, c.kl_coef, tis)
