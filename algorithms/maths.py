"""Shared maths of the zoo, written once: masked reductions, advantages, KL estimators.

Pure functions of tensors. ``mask`` is 1 for completion tokens and 0 for padding (and
prompt tokens, which never enter a loss, a KL or a normalisation). The formulas, with their
papers: docs/maths.md (§1 reductions, §3 KL estimators, §4 GAE, §5 the clipped surrogate).
"""

from __future__ import annotations

import torch

from rlhf_env.errors import SettingError


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask over ``dim`` (all dims if None)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1, over ``dim`` (all if None); 0 where nothing is masked in."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def group_std(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B/G,) sample standard deviation (Bessel-corrected, n−1) of each group's scores.

    Args:
        scores: (B,) with row i in group i // G (the env's layout).
    """
    return scores.view(-1, group_size).std(dim=1, unbiased=True)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked-in entries (biased variance); padding stays 0 (docs/maths.md §1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float):
    """Generalised advantage estimation over right-padded token sequences (docs/maths.md §4).

    δ_t = r_t + γ V(s_{t'}) − V(s_t) with t' the next real token after t (V = 0 after the last);
    Â_t = δ_t + γλ Â_{t'};  returns R̂_t = Â_t + V(s_t).

    Args:
        rewards, values: (B, T) per-token rewards and values V(s_t).
        mask: (B, T) 1 for real tokens (the policy's actions). Positions outside it are skipped,
            not restarted at: a multi-turn episode's injected spans are holes the scan steps over,
            so a turn's advantage sees the turns after it (one γ per policy token, none per hole).
    Returns:
        (advantages, returns), each (B, T), 0 outside the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    real = mask > 0
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # Â at the next real token
    next_value = torch.zeros_like(values[:, 0])  # V at the next real token
    for t in reversed(range(values.shape[1])):  # a scan over time; T is short
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = delta + gamma * gae_lambda * running
        advantages[:, t] = here * mask[:, t]
        running = torch.where(real[:, t], here, running)
        next_value = torch.where(real[:, t], values[:, t], next_value)
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


# -- the 2025 zoo's shared pieces (RLOO, REINFORCE++, GSPO, CISPO, DAPO) ------------------------


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) for each row, the mean of the *other* k−1 scores of its group (docs/maths.md §13).

    b_i = (Σ_j r_j − r_i) / (k − 1), row i in group i // k (the env's layout).

    Args:
        scores: (B,) rewards, B a multiple of ``group_size`` = k ≥ 2.
    """
    if group_size < 2 or scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(
            f"scores must be (B,) with B a multiple of group_size={group_size} >= 2, got {tuple(scores.shape)}"
        )
    grouped = scores.view(-1, group_size)
    return ((grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)).reshape(-1)


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level aggregation: Σ_i Σ_t x_it / Σ_i |y_i| (every token of the batch weighs the same). x, mask: (B, T)."""
    return masked_mean(x, mask)


def seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level aggregation: (1/B) Σ_i (1/|y_i|) Σ_t x_it (GRPO's). x, mask: (B, T)."""
    return masked_mean(x, mask, dim=1).mean()


def seq_sum_norm(x: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Σ_i Σ_t x_it / (max_new_tokens · B): a constant normaliser (Dr. GRPO's). x, mask: (B, T)."""
    return masked_sum(x, mask) / (max_new_tokens * x.shape[0])


def asymmetric_clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float):
    """min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) and where the clip changed it (DAPO's clip-higher, docs/maths.md §13).

    With ε_low = ε_high = ε this is ``clipped_surrogate`` on a given ratio.

    Args:
        ratio: ρ, any shape (per token (B, T) or per sequence (B,)), with gradients.
        advantages: Â, broadcastable to ``ratio``; no gradient.
    Returns:
        (surrogate, clipped bool): clipped where ρ > 1+ε_high with Â > 0 or ρ < 1−ε_low with Â < 0.
    """
    adv = advantages.detach()
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    r = ratio.detach()
    return surrogate, ((r > 1 + eps_high) & (adv > 0)) | ((r < 1 - eps_low) & (adv < 0))


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) GSPO's length-normalised sequence ratio s_i = exp((1/|y_i|) Σ_t (log π_θ − log π_old)) (docs/maths.md §13).

    Args:
        logp: (B, T) log π_θ (with gradients); old_logp: (B, T) log π_old (no gradient); mask: (B, T).
    """
    return torch.exp(masked_mean(logp - old_logp.detach(), mask, dim=1))


def check_asymmetric_clip(eps_low: float, eps_high: float) -> None:
    """Raise ``ValueError`` unless 0 < ε_low < 1 and ε_high > 0 (clip-higher, docs/maths.md §13)."""
    if not (0 < eps_low < 1):
        raise SettingError(f"clip_eps_low must be in (0, 1), got {eps_low}")
    if not eps_high > 0:
        raise SettingError(f"clip_eps_high must be > 0, got {eps_high}")


def truncated_is_weights(
    old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, docs/maths.md §25): w_t = min(π_θold(y_t) / π_sampler(y_t), C).

    For rollouts whose sampler's log-probs differ from the trainer's forward (another
    generation engine, other kernels): each token's policy-gradient term is weighted by
    ``w_t``, which corrects the mismatch in expectation while ``C`` bounds the variance.
    old_logp, sampler_logp, mask: (B, T); returns (B, T), 0 off the mask, no gradient.
    """
    if not cap > 0:
        raise SettingError(f"the truncation cap C must be > 0, got {cap}")
    w = torch.exp((old_logp - sampler_logp).detach()).clamp(max=cap)
    return w * mask
