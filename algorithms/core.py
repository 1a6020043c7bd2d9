"""Shared maths of the zoo, written once: masked reductions, advantages, KL estimators.

Pure functions of tensors. ``mask`` is 1 for completion tokens and 0 for padding (and
prompt tokens, which never enter a loss, a KL or a normalisation). The formulas, with their
papers: docs/maths.md (§1 reductions, §3 KL estimators, §4 GAE, §5 the clipped surrogate).
"""

from __future__ import annotations

import torch

from rlhf_env.scoring import token_logprobs  # noqa: F401  (re-exported: log-probs from logits)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask over ``dim`` (all dims if None)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1, over ``dim`` (all if None); 0 where nothing is masked in."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked-in entries (biased variance); padding stays 0 (docs/maths.md §1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float):
    """Generalised advantage estimation over right-padded token sequences (docs/maths.md §4).

    δ_t = r_t + γ V(s_{t+1}) − V(s_t) with V = 0 after the last real token;
    Â_t = Σ_l (γλ)^l δ_{t+l};  returns R̂_t = Â_t + V(s_t).

    Args:
        rewards, values: (B, T) per-token rewards and values V(s_t).
        mask: (B, T) 1 for real tokens: one contiguous run per row (a prefix, or a completion
            after its prompt in action coordinates); the scan restarts at 0 outside the mask.
    Returns:
        (advantages, returns), each (B, T), 0 on padding.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * torch.cat(
        [mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1
    )
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):  # a scan over time; T is short
        running = deltas[:, t] + gamma * gae_lambda * running * mask[:, t]
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref (unbiased, can be negative; docs/maths.md §3)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π − log π_ref)² (biased, low variance; docs/maths.md §3)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = π_ref/π − log(π_ref/π) − 1 (unbiased, ≥ 0): the GRPO estimator (docs/maths.md §3)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float):
    """Per-token PPO surrogate min(ρ Â, clip(ρ, 1−ε, 1+ε) Â), ρ = exp(log π − log π_old) (docs/maths.md §5).

    Args:
        logp: (B, T) log π_θ of the taken tokens (with gradients).
        old_logp: (B, T) log π_θold (no gradient flows into it).
        advantages: Â, (B, T) or broadcastable to it (e.g. (B, 1) per completion); no gradient.
        clip_eps: ε > 0.
    Returns:
        (surrogate (B, T), ratio (B, T)).
    """
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach()
    return torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv), ratio


def clipped(ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """Where clipping changed the objective: ρ > 1+ε with Â > 0, or ρ < 1−ε with Â < 0.

    There the min of ``clipped_surrogate`` takes the clipped term, which differs from ρÂ, and
    the token's gradient is cut. A ratio outside [1−ε, 1+ε] on the side the advantage does
    not push towards is *not* clipped: the min keeps ρÂ. ``policy/clipfrac`` is the masked
    mean of this (docs/maths.md §5), as PPO, TRL and verl count it.

    Args:
        ratio: (B, T) ρ; advantages: (B, T) or broadcastable to it.
    Returns:
        (B, T) bool.
    """
    adv = advantages.detach()
    ratio = ratio.detach()
    return ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
