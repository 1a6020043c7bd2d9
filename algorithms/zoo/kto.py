"""KTO, Kahneman-Tversky optimisation (Ethayarajh et al., 2024): unpaired desirable and undesirable examples.

Each example is one completion with a label, desirable or undesirable; there is no pairing.
With r_θ(x, y) = log π_θ(y|x) − log π_ref(y|x) and the reference point z₀, a detached,
non-negative estimate of KL(π_θ ‖ π_ref) from *mismatched* pairs (x_i, y_j), j ≠ i:

    v(x, y) = λ_D σ(β (r_θ(x, y) − z₀))   if y is desirable
              λ_U σ(β (z₀ − r_θ(x, y)))   if y is undesirable
    L = mean over the batch of (λ_y − v(x, y))

The examples come from the same data as DPO (``rlhf_env.algorithms.zoo.dpo.load_pairs``: the task's
simulated annotators or a user file), unpaired as the paper does with preference data:
every chosen completion is a desirable example, every rejected one an undesirable example,
and each step draws a random mix of them. Each example's mismatched completion is fixed
once (the next example's in a seeded cyclic order), so log π_ref of both is computed once.
The formulas: docs/maths.md §21.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_env.algorithms.base import BatchShape, TrainContext
from rlhf_env.algorithms.maths import masked_mean
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Optimizer, Stateful, draw_part
from rlhf_env.algorithms.zoo.dpo import PairConfig, load_pairs, sequence_logprobs
from rlhf_env.errors import SettingError
from rlhf_env.models import pad_token_id
from rlhf_env.progress import Progress
from rlhf_env.scoring import encode_completion, pack_completions


@dataclass
class Config(PairConfig):
    """KTO's settings. The defaults were measured on the 1-digit arithmetic task (base gold 0.39,
    300 steps of 64 examples, seeds 0-2): DPO's lr 3e-4 with λ_U = 1 unlearns (gold 0.27, KL 2.9
    nats: the undesirable pushes drag the desirable log-ratios down with them). With
    λ_D n_D / (λ_U n_U) = 4/3, the top of the paper's range: lr 3e-5 gains only 0.03-0.04 (noise);
    lr 1e-4 (DPO's on arithmetic) gains 0.07-0.14 at KL 0.4-0.5 nats; lr 3e-4 with β = 0.5
    gains 0.14-0.23 after 300 steps but is erratic on the way (−0.13 to +0.03 after 150 steps,
    KL up to 1 nat), so 1e-4 (docs/maths.md §21). On the full suite's sentiment task (learned
    reward, base −0.082) lr 1e-4 ends at gold 0.164 ± 0.050, 3e-5 at −0.045 ± 0.016.
    """

    lr: float = 1e-4  # KTO has no pairwise cancellation of shared tokens: a lower lr than DPO's default
    beta: float = 1.0  # β: sharpness of the value function around the reference point
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 0.75  # λ_U: λ_D n_D / (λ_U n_U) = 4/3 (the paper keeps it in [1, 4/3])

    name = "KTO"

    def batch_shape(self) -> BatchShape:
        """batch_size unpaired examples, one row each; no rollout; the ranks split the examples."""
        return BatchShape(self.batch_size, 0, "batch_size")

    def __post_init__(self):
        if not self.beta > 0:
            raise SettingError(f"KTO beta must be > 0, got {self.beta}")
        if not self.desirable_weight > 0 or not self.undesirable_weight > 0:
            raise SettingError(
                f"KTO desirable_weight and undesirable_weight (λ_D, λ_U) must be > 0, "
                f"got {self.desirable_weight}, {self.undesirable_weight}"
            )
        super().__post_init__()


# -- the maths ---------------------------------------------------------------------------


def kto_reference_point(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """z₀ = max(0, mean(log π_θ(y'|x) − log π_ref(y'|x))) over mismatched pairs, detached (docs/maths.md §21).

    Args:
        policy_mismatched, ref_mismatched: (B,) sequence log-probs of (x_i, y_j), j ≠ i.
    Returns:
        A scalar ≥ 0 without gradient: the paper does not backpropagate through z₀.
    """
    return (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean(λ_y − v(x, y)) with v the KTO value around z₀ (docs/maths.md §21).

    Args:
        policy_logp: (B,) log π_θ(y|x), summed over completion tokens.
        ref_logp: (B,) log π_ref(y|x) (no gradient).
        desirable: (B,) bool, True for a desirable example.
        z0: the reference point (scalar, no gradient).
        beta: β > 0; desirable_weight, undesirable_weight: λ_D, λ_U > 0.
    Returns:
        ``(loss, rewards)``: a scalar, and (B,) detached r_θ = log π_θ − log π_ref.
    """
    r = policy_logp - ref_logp
    sign = torch.where(desirable, 1.0, -1.0)  # desirable: σ(β(r − z₀)); undesirable: σ(β(z₀ − r))
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    loss = (weight * (1 - torch.sigmoid(sign * beta * (r - z0)))).mean()
    return loss, r.detach()


# -- the trainer ---------------------------------------------------------------------------


class Trainer(Stateful):
    def __init__(self, ctx: TrainContext, config: Config, reference_batch_size: int = 256):
        self.ctx, self.config = ctx, config
        pairs = load_pairs(ctx, config)
        # Unpaired: chosen completions are desirable, rejected ones undesirable.
        self.examples = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        self.desirable = torch.tensor([True] * len(pairs) + [False] * len(pairs), device=ctx.device)
        n = len(self.examples)
        # The mismatched completion of each example: the next one's in a seeded cyclic order.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed)).tolist()
        partner = [0] * n
        for k, i in enumerate(order):
            partner[i] = order[(k + 1) % n]
        tok, fmt = ctx.tokenizer, ctx.prompt_format
        self.encoded = [encode_completion(tok, x, y, prompt_format=fmt) for x, y in self.examples]
        self.mismatched = [
            encode_completion(tok, x, self.examples[j][1], prompt_format=fmt)
            for (x, _), j in zip(self.examples, partner)
        ]
        limit = getattr(ctx.policy.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids, _ in self.encoded + self.mismatched)
        if limit is not None and longest > limit:
            raise SettingError(f"a KTO example is {longest} tokens long; the model reads at most {limit}")
        self.pad, self.vocab_size = pad_token_id(tok), len(tok)
        with Progress(2 * n, "reference log-probs", "examples") as bar:  # the examples, then their mismatches
            self.ref_logp = self.logprobs(ctx.ref, self.encoded, reference_batch_size, bar)
            self.ref_mismatched = self.logprobs(ctx.ref, self.mismatched, reference_batch_size, bar)
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)

    @torch.no_grad()
    def logprobs(self, model, rows, batch_size: int, bar: Progress | None = None) -> torch.Tensor:
        """(n,) sequence log-probs of encoded rows, without gradient; ``bar`` advances a unit a row."""
        parts = []
        for s in range(0, len(rows), batch_size):
            ids, attn, mask = pack_completions(rows[s : s + batch_size], self.pad, self.ctx.device)
            parts.append(sequence_logprobs(model, ids, attn, mask, self.vocab_size))
            if bar is not None:
                bar.update(len(parts[-1]))
        return torch.cat(parts)

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        part = draw_part(len(self.examples), c.batch_size, seed)
        idx = part.rows.tolist()
        index = torch.tensor(idx, device=self.ctx.device)
        policy_mismatched = self.logprobs(policy, [self.mismatched[i] for i in idx], len(idx))
        z0 = kto_reference_point(policy_mismatched, self.ref_mismatched[index])
        ids, attn, mask = pack_completions([self.encoded[i] for i in idx], self.pad, self.ctx.device)
        logp = sequence_logprobs(policy, ids, attn, mask, self.vocab_size)
        desirable = self.desirable[index]
        weights = (c.desirable_weight, c.undesirable_weight)
        loss, rewards = kto_loss(logp, self.ref_logp[index], desirable, z0, c.beta, *weights)
        grad_norm = self.optimizer.step(loss, weight=part.weight, policy=loss)
        d = desirable.float()
        return {
            M.LOSS_POLICY: loss.item(),
            M.OPTIM_GRAD_NORM: grad_norm,
            M.KTO_REFERENCE_POINT: z0.item(),
            M.KTO_DESIRABLE_REWARD: masked_mean(rewards, d).item(),
            M.KTO_UNDESIRABLE_REWARD: masked_mean(rewards, 1 - d).item(),
            M.PERF_TOKENS: float(mask.sum()),
        }
