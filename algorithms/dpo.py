"""DPO, direct preference optimisation (Rafailov et al., 2023): RLHF without a reward model.

    L = −mean log σ(β[log π_θ(y+|x) − log π_ref(y+|x)] − β[log π_θ(y−|x) − log π_ref(y−|x)])

Offline: the preference pairs come once, at the start, from the task's simulated annotators
(two samples of the reference model per prompt, labelled Bradley-Terry on the gold reward)
or from a user file (``preference_file``: ``prompt``/``chosen``/``rejected`` columns). The
reference log-probs of every pair are computed once then too. Each step takes a random
minibatch of pairs. The loop still evaluates the policy with env rollouts (gold reward, KL).

A completion is scored as the base models were trained (``rlhf_env.scoring.sft_loss``): the
prompt's ids, then the completion's ids and EOS; log π(y|x) sums over the completion and
EOS tokens only, never the prompt or the padding. The formulas: docs/maths.md §9.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from algorithms import metrics as M
from algorithms.base import TrainContext
from algorithms.core import masked_sum
from algorithms.plumbing import Optimizer, Stateful, draw_rows
from rlhf_env.models import pad_token_id
from rlhf_env.scoring import encode_completion, next_token_logprobs, pack_completions
from rlhf_env.tasks.base import PreferencePair


@dataclass
class Config:
    beta: float = 1.0  # β: strength of the implicit KL to the reference (short completions want a large β)
    lr: float = 3e-4
    batch_size: int = 64  # pairs per step
    num_pairs: int = 2048  # pairs drawn from the task's annotators (ignored with preference_file)
    annotator_tau: float = 0.25  # the simulated annotator's temperature τ
    preference_file: str | None = None  # .jsonl/.json/.csv/.parquet with prompt, chosen, rejected
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"DPO beta must be > 0, got {self.beta}")
        if not self.lr > 0 or not self.max_grad_norm > 0:
            raise ValueError(f"DPO lr and max_grad_norm must be > 0, got {self.lr}, {self.max_grad_norm}")
        if self.batch_size < 1 or self.num_pairs < 1:
            raise ValueError(f"DPO batch_size and num_pairs must be >= 1, got {self.batch_size}, {self.num_pairs}")
        if not self.annotator_tau > 0:
            raise ValueError(f"DPO annotator_tau must be > 0, got {self.annotator_tau}")
        if self.preference_file is not None and not Path(self.preference_file).expanduser().is_file():
            raise FileNotFoundError(f"DPO preference_file {self.preference_file!r} is not a file")


# -- the maths ---------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """−mean log σ(β[(π+ − r+) − (π− − r−)]) and the implicit rewards (docs/maths.md §9).

    Args:
        policy_chosen, policy_rejected: (B,) log π_θ(y±|x), summed over completion tokens.
        ref_chosen, ref_rejected: (B,) log π_ref(y±|x) (no gradient).
        beta: β > 0.
    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: a scalar, and (B,) detached
        β(log π_θ(y±|x) − log π_ref(y±|x)).
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """(B,) log π(y|x) = Σ_t over completion tokens of log π(y_t | x, y_<t); prompt and padding masked out.

    ``vocab_size``: the tokenizer's size, as in ``token_logprobs``.
    """
    return masked_sum(next_token_logprobs(model, input_ids, attention_mask, vocab_size), completion_mask, 1)


# -- the trainer ---------------------------------------------------------------------------


def load_pairs(ctx: TrainContext, config: Config) -> list[PreferencePair]:
    """The user's file when given, else ``num_pairs`` simulated-annotator pairs of the reference model."""
    if config.preference_file is not None:
        from rlhf_env.tasks.data import load_preferences

        return load_preferences(config.preference_file)
    return ctx.task.preference_pairs(ctx.ref, ctx.tokenizer, config.num_pairs, tau=config.annotator_tau, seed=ctx.seed)


class Trainer(Stateful):
    def __init__(self, ctx: TrainContext, config: Config, eval_batch_size: int = 256):
        self.ctx, self.config = ctx, config
        self.pairs = load_pairs(ctx, config)
        tok = ctx.tokenizer
        self.chosen = [encode_completion(tok, p.prompt, p.chosen) for p in self.pairs]
        self.rejected = [encode_completion(tok, p.prompt, p.rejected) for p in self.pairs]
        limit = getattr(ctx.policy.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids, _ in self.chosen + self.rejected)
        if limit is not None and longest > limit:
            raise ValueError(f"a preference pair is {longest} tokens long; the model reads at most {limit}")
        self.pad, self.vocab_size = pad_token_id(tok), len(tok)
        # log π_ref(y±|x), once per pair.
        ref_c, ref_r = [], []
        with torch.no_grad():
            for s in range(0, len(self.pairs), eval_batch_size):
                rows = self.chosen[s : s + eval_batch_size] + self.rejected[s : s + eval_batch_size]
                lp = sequence_logprobs(ctx.ref, *pack_completions(rows, self.pad, ctx.device), self.vocab_size)
                n = len(rows) // 2
                ref_c.append(lp[:n])
                ref_r.append(lp[n:])
        self.ref_chosen, self.ref_rejected = torch.cat(ref_c), torch.cat(ref_r)
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)

    def step(self, step: int, seed: int) -> dict[str, float]:
        c, policy = self.config, self.ctx.policy
        idx = draw_rows(len(self.pairs), c.batch_size, seed)
        rows = [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx]
        ids, attn, mask = pack_completions(rows, self.pad, self.ctx.device)
        logp = sequence_logprobs(policy, ids, attn, mask, self.vocab_size)  # chosen and rejected in one forward
        b = len(idx)
        index = torch.tensor(idx, device=logp.device)
        ref_c, ref_r = self.ref_chosen[index], self.ref_rejected[index]
        loss, chosen_r, rejected_r = dpo_loss(logp[:b], logp[b:], ref_c, ref_r, c.beta)
        grad_norm = self.optimizer.step(loss, policy=loss)
        return {
            M.LOSS_POLICY: loss.item(),
            M.OPTIM_GRAD_NORM: grad_norm,
            M.DPO_REWARD_ACCURACY: (chosen_r > rejected_r).float().mean().item(),
            M.DPO_REWARD_MARGIN: (chosen_r - rejected_r).mean().item(),
            M.DPO_CHOSEN_REWARD: chosen_r.mean().item(),
            M.DPO_REJECTED_REWARD: rejected_r.mean().item(),
            M.PERF_TOKENS: float(mask.sum()),
        }
