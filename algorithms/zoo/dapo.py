"""DAPO: Decoupled clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025), a GRPO variant.

GRPO's group-normalised advantages (docs/maths.md §7) with four changes (docs/maths.md §18):

- **Clip-higher**: min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) with ε_high > ε_low, so unlikely
  tokens can gain probability faster (against entropy collapse).
- **Token-level aggregation**: the surrogate is averaged over every token of the minibatch,
  Σ_i Σ_t o_{i,t} / Σ_i |y_i|, so long completions are not down-weighted.
- **Dynamic sampling**: a group whose rewards are all equal has Â = 0 and gives no gradient;
  such groups are dropped and more groups sampled until ``num_prompts`` are kept (at most
  ``max_sample_rounds`` rollouts a step; if every group ties, the last rollout is used).
- **Overlong reward shaping**: with L_max = max_new_tokens and L_cache = ``overlong_buffer``,
  a completion longer than L_max − L_cache loses (|y| − (L_max − L_cache)) / L_cache · penalty.

No KL penalty (β = 0), as the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_env.algorithms.base import RolloutBatch, collect_rollouts
from rlhf_env.algorithms.maths import asymmetric_clipped_surrogate, check_asymmetric_clip, kl_k3, token_mean
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.zoo import grpo
from rlhf_env.algorithms.zoo.grpo import LossParts
from rlhf_env.errors import SettingError
from rlhf_env.seeding import derive


@dataclass
class Config(grpo.GroupConfig):
    kl_coef: float = 0.0  # DAPO drops the KL penalty
    clip_eps_low: float = 0.2  # ε_low
    clip_eps_high: float = 0.28  # ε_high (Yu et al. §3.1)
    max_sample_rounds: int = 3  # rollouts a step at most, to fill the batch with informative groups
    overlong_buffer: int = 1  # L_cache, in tokens; 0 turns the length penalty off
    overlong_penalty: float = 1.0  # the penalty at |y| = L_max

    def __post_init__(self):
        super().__post_init__()
        check_asymmetric_clip(self.clip_eps_low, self.clip_eps_high)
        if self.max_sample_rounds < 1:
            raise SettingError(f"max_sample_rounds must be >= 1, got {self.max_sample_rounds}")
        if self.overlong_buffer < 0 or self.overlong_penalty < 0:
            raise SettingError(
                f"overlong_buffer and overlong_penalty must be >= 0, got {self.overlong_buffer}, {self.overlong_penalty}"
            )


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment: 0 up to L_max − L_cache, then linear down to −penalty at L_max.

    Args:
        lengths: (B,) completion lengths |y_i| in tokens (≤ ``max_len``).
        max_len: L_max; buffer: L_cache (0: no penalty).
    """
    if buffer == 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0, max=buffer)
    return -penalty * over / buffer


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B/G,) bool: the groups whose rewards are not all equal (the ones dynamic sampling keeps)."""
    grouped = scores.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def dapo_loss(
    logp, old_logp, ref_logp, advantages, mask, eps_low=0.2, eps_high=0.28, kl_coef=0.0, tis=None
) -> LossParts:
    """−token_mean(min(ρ Â_i, clip(ρ, 1−ε_low, 1+ε_high) Â_i)) + β token_mean(k3).

    Args:
        logp: (B, T) log π_θ (with gradients); old_logp, ref_logp: (B, T).
        advantages: (B,) Â_i; mask: (B, T) 1 on completion tokens.
        tis: (B, T) truncated importance weights multiplying the surrogate (an inexact generator), or None.
    """
    ratio = torch.exp(logp - old_logp.detach())
    surrogate, clipped = asymmetric_clipped_surrogate(ratio, advantages[:, None], eps_low, eps_high)
    if tis is not None:
        surrogate = surrogate * tis
    policy = -token_mean(surrogate, mask)
    kl = kl_coef * token_mean(kl_k3(logp, ref_logp), mask)
    return LossParts(policy + kl, policy, kl, token_mean(clipped.to(mask.dtype), mask).detach())


def take_rows(batches: list[tuple[RolloutBatch, torch.Tensor]], pad_token_id: int) -> RolloutBatch:
    """One batch of the chosen rows of several, right-padded to the longest.

    Args:
        batches: (batch, (b,) int64 row indices) pairs.
    """
    L = max(b.input_ids.shape[1] for b, _ in batches)

    def cat(name: str, pad_value: float) -> torch.Tensor:
        parts = []
        for b, rows in batches:
            x = getattr(b, name)[rows]
            parts.append(torch.nn.functional.pad(x, (0, L - b.input_ids.shape[1]), value=pad_value))
        return torch.cat(parts)

    weighted = all(b.is_weights is not None for b, _ in batches)  # an inexact generator's rounds
    diffs = [b.logprob_diff for b, _ in batches if b.logprob_diff is not None]
    return RolloutBatch(
        prompts=[b.prompts[r] for b, rows in batches for r in rows.tolist()],
        completions=[b.completions[r] for b, rows in batches for r in rows.tolist()],
        input_ids=cat("input_ids", pad_token_id),
        attention_mask=cat("attention_mask", 0),
        **{name: cat(name, 0.0) for name in ("action_mask", "logprobs", "ref_logprobs", "rewards")},
        scores=torch.cat([b.scores[rows] for b, rows in batches]),
        vocab_size=batches[0][0].vocab_size,
        is_weights=cat("is_weights", 0.0) if weighted else None,
        logprob_diff=sum(diffs) / len(diffs) if diffs else None,  # the mean over the rounds kept
    )


class Trainer(grpo.Trainer):
    """GRPO's trainer with DAPO's rollout (dynamic sampling, overlong shaping) and loss."""

    token_level = True

    def __init__(self, ctx, config: Config):
        if config.overlong_buffer >= ctx.task.max_new_tokens:
            raise SettingError(
                f"overlong_buffer={config.overlong_buffer} must be below the task's max_new_tokens={ctx.task.max_new_tokens}"
            )
        super().__init__(ctx, config)

    def loss(self, logp, old_logp, ref_logp, advantages, mask, tis=None) -> LossParts:
        c = self.config
        return dapo_loss(logp, old_logp, ref_logp, advantages, mask, c.clip_eps_low, c.clip_eps_high, c.kl_coef, tis)

    def rollout(self, seed: int):
        c, G = self.config, self.config.group_size
        env = self.ctx.env(c.num_prompts * G, group_size=G, beta=0.0)
        kept: list[tuple[RolloutBatch, torch.Tensor]] = []
        n_kept = sampled = 0
        for round_ in range(c.max_sample_rounds):
            batch = collect_rollouts(self.ctx, env, derive(seed, "round", round_))  # a fresh draw each round
            lengths = batch.action_mask.sum(1)
            batch.scores = batch.scores + overlong_penalty(
                lengths, self.ctx.task.max_new_tokens, c.overlong_buffer, c.overlong_penalty
            )
            groups = informative_groups(batch.scores, G).nonzero().flatten()[: c.num_prompts - n_kept]
            sampled += c.num_prompts
            if len(groups):
                rows = (groups[:, None] * G + torch.arange(G)).flatten()
                kept.append((batch, rows.to(batch.scores.device)))
                n_kept += len(groups)
            if n_kept == c.num_prompts:
                break
        if not kept:  # every group tied: Â = 0, the update only moves by the KL term
            kept = [(batch, torch.arange(len(batch.scores), device=batch.scores.device))]
        batch = take_rows(kept, env.core.pad_token_id)
        advantages = grpo.group_advantages(batch.scores, G, True, c.std_eps)
        return batch, advantages, {M.REWARD_GROUPS_KEPT: n_kept / sampled}
