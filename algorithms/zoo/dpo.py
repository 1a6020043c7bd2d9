"""DPO, direct preference optimisation (Rafailov et al., 2023): RLHF without a reward model.

    L = −mean log σ(β[log π_θ(y+|x) − log π_ref(y+|x)] − β[log π_θ(y−|x) − log π_ref(y−|x)])

Offline: the preference pairs come once, at the start, from the task's simulated annotators
(two samples of the reference model per prompt, labelled Bradley-Terry on the gold reward)
or from a user file (``preference_file``: ``prompt``/``chosen``/``rejected`` columns). The
reference log-probs of every pair are computed once then too. Each step takes a random
minibatch of pairs. The loop still evaluates the policy with env rollouts (gold reward, KL).

A completion is scored as the base models were trained (``rlhf_env.scoring.sft_loss``): the
prompt's ids, then the completion's ids and EOS; log π(y|x) sums over the completion and
EOS tokens only, never the prompt or the padding. A pair is scored as one row in which the
prompt runs once for both completions (``rlhf_env.packing.branch_logprobs``), where the
model takes explicit attention masks; else as two padded rows. The formulas: docs/maths.md §9.

Two registered variants share the pairs, the encodings and the trainer and differ only in
the pair loss: IPO (Azar et al. 2023; ``ipo_loss``, docs/maths.md §19) and SimPO (Meng et
al. 2024; ``simpo_loss``, reference-free and length-normalised, docs/maths.md §20).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from rlhf_env.algorithms.base import BatchShape, TrainContext
from rlhf_env.algorithms.maths import masked_sum
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Optimizer, Stateful, check_optimizer_settings, draw_part
from rlhf_env.errors import MissingFileError, SettingError
from rlhf_env.models import pad_token_id
from rlhf_env.packing import branch_logprobs, shares_prompts
from rlhf_env.progress import Progress
from rlhf_env.scoring import encode_completion, next_token_logprobs, pack_completions
from rlhf_env.tasks.base import PreferencePair


@dataclass
class PairConfig:
    """What every offline pair variant shares: the pair data, the optimizer, the batch."""

    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 5e-7}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 5e-6}

    lr: float = 3e-4
    batch_size: int = 64  # pairs per step
    num_pairs: int = 2048  # pairs drawn from the task's annotators (ignored with preference_file)
    annotator_tau: float = 0.25  # the simulated annotator's temperature τ
    preference_file: str | None = None  # .jsonl/.json/.csv/.parquet with prompt, chosen, rejected
    max_grad_norm: float = 1.0

    name = "DPO"  # how errors name the algorithm (a class attribute, not a field)

    def batch_shape(self) -> BatchShape:
        """batch_size pairs, chosen and rejected in one forward; no rollout; the ranks split the pairs."""
        return BatchShape(2 * self.batch_size, 0, "batch_size")

    def __post_init__(self):
        check_optimizer_settings(self, self.name)
        if self.batch_size < 1 or self.num_pairs < 1:
            raise SettingError(
                f"{self.name} batch_size and num_pairs must be >= 1, got {self.batch_size}, {self.num_pairs}"
            )
        if not self.annotator_tau > 0:
            raise SettingError(f"{self.name} annotator_tau must be > 0, got {self.annotator_tau}")
        if self.preference_file is not None and not Path(self.preference_file).expanduser().is_file():
            raise MissingFileError(f"{self.name} preference_file {self.preference_file!r} is not a file")


@dataclass
class Config(PairConfig):
    beta: float = 1.0  # β: strength of the implicit KL to the reference (short completions want a large β)

    def __post_init__(self):
        if not self.beta > 0:
            raise SettingError(f"DPO beta must be > 0, got {self.beta}")
        super().__post_init__()


@dataclass
class IPOConfig(PairConfig):
    tau: float = 0.5  # τ: the regulariser; the loss pulls the log-ratio margin towards 1/(2τ)

    name = "IPO"

    def __post_init__(self):
        if not self.tau > 0:
            raise SettingError(f"IPO tau must be > 0 (the target margin is 1/(2 tau)), got {self.tau}")
        super().__post_init__()


@dataclass
class SimPOConfig(PairConfig):
    """SimPO's settings. ``sft_weight`` defaults to 1 (CPO-SimPO; docs/maths.md §20), measured on
    the 1-digit arithmetic task (base gold 0.39, 300 steps, seeds 0-2): plain SimPO lowers both
    likelihoods, the right answer's too (mean log-prob per token −0.41 → −0.58 on the pairs whose
    chosen is right), and the freed mass goes to completions no pair holds (malformed answers
    1% → 14%): gold −0.17 ± 0.10, KL 1.7-4.7 nats. On seed 0, lr 3e-5 only slows that (gold
    flat, the right answer's log-prob flat while the margin grows), and γ 0-1 with DPO's
    arithmetic settings (lr 1e-4, batch 16, pairs seen once) still ends below the base. Nearly 40% of the pairs are
    two wrong answers, and SimPO weights them most (margin ≈ 0 < γ) while the informative pairs
    already sit near the margin. With α = 1 the right answers rise (−0.41 → −0.29): gold
    +0.09 ± 0.05 at KL 0.3-0.4 nats; α = 2 gives +0.10 ± 0.05. Most of the gain is the NLL's:
    on seed 0 the NLL alone (β → 0) ends at 0.51, with SimPO's term 0.53 and a wider margin.
    """

    beta: float = 2.0  # β: scale of the length-normalised log-likelihood reward
    gamma: float = 0.5  # γ: the target reward margin
    sft_weight: float = 1.0  # α: weight of the chosen completion's NLL per token (CPO-SimPO); 0: plain SimPO

    name = "SimPO"

    def __post_init__(self):
        if not self.beta > 0:
            raise SettingError(f"SimPO beta must be > 0, got {self.beta}")
        if not self.gamma >= 0:
            raise SettingError(f"SimPO gamma (the target margin) must be >= 0, got {self.gamma}")
        if not self.sft_weight >= 0:
            raise SettingError(f"SimPO sft_weight (the chosen NLL's weight) must be >= 0, got {self.sft_weight}")
        super().__post_init__()


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


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO: mean (h − 1/(2τ))², h = (π+ − r+) − (π− − r−) the log-ratio margin (docs/maths.md §19).

    Args:
        policy_chosen, policy_rejected: (B,) log π_θ(y±|x), summed over completion tokens.
        ref_chosen, ref_rejected: (B,) log π_ref(y±|x) (no gradient).
        tau: τ > 0.
    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: a scalar, and (B,) detached
        τ(log π_θ(y±|x) − log π_ref(y±|x)) (the implicit rewards, τ in β's place).
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    # A squared loss: unlike −log σ it stops pushing once the margin reaches 1/(2τ), so the
    # policy cannot drift arbitrarily far from the reference on deterministic preferences.
    loss = ((chosen - rejected - 1 / (2 * tau)) ** 2).mean()
    return loss, (tau * chosen).detach(), (tau * rejected).detach()


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    length_chosen: torch.Tensor,
    length_rejected: torch.Tensor,
    beta: float,
    gamma: float,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: −mean log σ(β/|y+| log π_θ(y+|x) − β/|y−| log π_θ(y−|x) − γ) (docs/maths.md §20),
    plus ``sft_weight`` × mean(−log π_θ(y+|x)/|y+|), the chosen completions' NLL per token.

    No reference model: the reward is the policy's mean log-prob per token.

    Args:
        policy_chosen, policy_rejected: (B,) log π_θ(y±|x), summed over completion tokens.
        length_chosen, length_rejected: (B,) |y±|, the tokens summed over (completion + EOS).
        beta: β > 0; gamma: γ ≥ 0, the target margin; sft_weight: α ≥ 0 (0: plain SimPO).
    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: a scalar, and (B,) detached β/|y±| log π_θ(y±|x).
    """
    chosen_mean = policy_chosen / length_chosen
    chosen = beta * chosen_mean
    rejected = beta * policy_rejected / length_rejected
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    if sft_weight:
        # Without a reference the margin grows as well by lowering both likelihoods: the NLL
        # anchors the chosen completion (CPO's behaviour-cloning term, per token as SimPO's reward).
        loss = loss - sft_weight * chosen_mean.mean()
    return loss, chosen.detach(), rejected.detach()


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """(B,) log π(y|x) = Σ_t over completion tokens of log π(y_t | x, y_<t); prompt and padding masked out.

    ``vocab_size``: the tokenizer's size, as in ``token_logprobs``.
    """
    return masked_sum(next_token_logprobs(model, input_ids, attention_mask, vocab_size), completion_mask, 1)


def pair_rows(chosen, rejected, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each pair as one row ``prompt ∘ chosen ∘ rejected`` for ``branch_logprobs`` (the prompt run once).

    Args:
        chosen, rejected: per pair ``(ids, prompt_length)`` (``encode_completion``).
    Returns:
        ``(input_ids, segments, widths)``: (N, W) right-padded ids, (N, W) segments (0 prompt,
        1 chosen, 2 rejected, -1 padding) and (N,) row lengths; None when a pair's two
        encodings do not start with the same non-empty prompt (they are then scored apart).
    """
    rows, segs = [], []
    for (c, pc), (r, pr) in zip(chosen, rejected):
        if pc < 1 or pc != pr or c[:pc] != r[:pr]:
            return None
        rows.append(c + r[pr:])
        segs.append([0] * pc + [1] * (len(c) - pc) + [2] * (len(r) - pr))
    widths = torch.tensor([len(row) for row in rows])
    W = int(widths.max())
    ids = torch.tensor([row + [pad] * (W - len(row)) for row in rows])
    segments = torch.tensor([seg + [-1] * (W - len(seg)) for seg in segs])
    return ids, segments, widths


def pair_logprobs(model, ids: torch.Tensor, segments: torch.Tensor, vocab_size: int | None):
    """(B,) log π(y+|x), (B,) log π(y−|x) and their (B,) token counts, of ``pair_rows`` rows."""
    logp = branch_logprobs(model, ids, segments, vocab_size)
    chosen, rejected = segments == 1, segments == 2
    return (logp * chosen).sum(1), (logp * rejected).sum(1), chosen.sum(1), rejected.sum(1)


# -- the trainer ---------------------------------------------------------------------------


def load_pairs(ctx: TrainContext, config: Config) -> list[PreferencePair]:
    """The user's file when given, else ``num_pairs`` simulated-annotator pairs of the reference model,
    sampled by the run's generator (``ctx.generator``)."""
    if config.preference_file is not None:
        from rlhf_env.tasks.data import load_preferences

        return load_preferences(config.preference_file)
    return ctx.task.preference_pairs(
        ctx.ref,
        ctx.tokenizer,
        config.num_pairs,
        tau=config.annotator_tau,
        seed=ctx.seed,
        chat_template=ctx.chat_template,
        generator=ctx.generator,  # the run's generation backend samples the pairs too
    )


class Trainer(Stateful):
    """DPO on pairs; the variants below change only ``pair_loss`` (and whether the reference is needed)."""

    uses_reference = True  # False: no reference log-probs are computed (SimPO)

    def __init__(self, ctx: TrainContext, config: PairConfig, reference_batch_size: int = 256):
        self.ctx, self.config = ctx, config
        self.pairs = load_pairs(ctx, config)
        tok, fmt = ctx.tokenizer, ctx.prompt_format  # the env's ids for the same (prompt, completion)
        self.chosen = [encode_completion(tok, p.prompt, p.chosen, prompt_format=fmt) for p in self.pairs]
        self.rejected = [encode_completion(tok, p.prompt, p.rejected, prompt_format=fmt) for p in self.pairs]
        limit = getattr(ctx.policy.config, "max_position_embeddings", None)
        longest = max(len(ids) for ids, _ in self.chosen + self.rejected)
        if limit is not None and longest > limit:
            raise SettingError(f"a preference pair is {longest} tokens long; the model reads at most {limit}")
        self.pad, self.vocab_size = pad_token_id(tok), len(tok)
        # Chosen and rejected share the prompt: one row per pair runs it once (``branch_logprobs``),
        # where the model takes explicit masks; else a row per completion.
        shared = shares_prompts(ctx.policy) and (not self.uses_reference or shares_prompts(ctx.ref))
        self.rows = pair_rows(self.chosen, self.rejected, self.pad) if shared else None
        if self.rows is not None:
            self.rows = tuple(t.to(ctx.device) for t in self.rows)
        self.ref_chosen = self.ref_rejected = torch.zeros(len(self.pairs), device=ctx.device)
        if self.uses_reference:  # log π_ref(y±|x), once per pair
            self.ref_chosen, self.ref_rejected = self.reference_logprobs(reference_batch_size)
        self.optimizer = Optimizer(ctx.policy.parameters(), config.lr, config.max_grad_norm)

    @torch.no_grad()
    def reference_logprobs(self, reference_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) log π_ref(y+|x) and (N,) log π_ref(y−|x) of every pair, ``reference_batch_size`` pairs a forward."""
        ref_c, ref_r = [], []
        n = len(self.pairs)
        with Progress(n, "reference log-probs", "pairs") as bar:
            for s in range(0, n, reference_batch_size):
                c, r, _, _ = self.pair_batch(self.ctx.ref, torch.arange(s, min(s + reference_batch_size, n)))
                ref_c.append(c)
                ref_r.append(r)
                bar.set(s + len(c))
        return torch.cat(ref_c), torch.cat(ref_r)

    def pair_batch(self, model, index: torch.Tensor):
        """(B,) log π(y+|x), log π(y−|x), |y+| and |y−| of the pairs ``index``, in one forward."""
        if self.rows is not None:
            ids, segments, widths = self.rows
            index = index.to(widths.device)
            W = int(widths[index].max())  # trimmed to the longest row drawn
            return pair_logprobs(model, ids[index, :W], segments[index, :W], self.vocab_size)
        rows = [self.chosen[i] for i in index.tolist()] + [self.rejected[i] for i in index.tolist()]
        ids, attn, mask = pack_completions(rows, self.pad, self.ctx.device)
        logp, lengths = sequence_logprobs(model, ids, attn, mask, self.vocab_size), mask.sum(1)
        b = len(index)
        return logp[:b], logp[b:], lengths[:b], lengths[b:]

    def pair_loss(self, policy_c, policy_r, ref_c, ref_r, length_c, length_r):
        """The variant's loss of (B,) sequence log-probs and lengths: ``(loss, chosen_r, rejected_r)``."""
        return dpo_loss(policy_c, policy_r, ref_c, ref_r, self.config.beta)

    def step(self, step: int, seed: int) -> dict[str, float]:
        policy = self.ctx.policy
        part = draw_part(len(self.pairs), self.config.batch_size, seed)
        index = torch.tensor(part.rows.tolist(), device=self.ctx.device)
        policy_c, policy_r, length_c, length_r = self.pair_batch(policy, index)  # chosen and rejected in one forward
        ref_c, ref_r = self.ref_chosen[index], self.ref_rejected[index]
        loss, chosen_r, rejected_r = self.pair_loss(policy_c, policy_r, ref_c, ref_r, length_c, length_r)
        grad_norm = self.optimizer.step(loss, weight=part.weight, policy=loss)
        return {
            **pair_metrics(loss, grad_norm, chosen_r, rejected_r),
            **self.reward_metrics(chosen_r, rejected_r),
            M.PERF_TOKENS: float(length_c.sum() + length_r.sum()),
        }

    def reward_metrics(self, chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict[str, float]:
        return {M.DPO_CHOSEN_REWARD: chosen_r.mean().item(), M.DPO_REJECTED_REWARD: rejected_r.mean().item()}


def pair_metrics(loss: torch.Tensor, grad_norm: float, chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict:
    """The metrics every pairwise trainer logs: loss, gradient norm, implicit-reward accuracy and margin."""
    return {
        M.LOSS_POLICY: loss.item(),
        M.OPTIM_GRAD_NORM: grad_norm,
        M.DPO_REWARD_ACCURACY: (chosen_r > rejected_r).float().mean().item(),
        M.DPO_REWARD_MARGIN: (chosen_r - rejected_r).mean().item(),
    }


class IPOTrainer(Trainer):
    """IPO: the squared loss toward the margin 1/(2τ)."""

    def pair_loss(self, policy_c, policy_r, ref_c, ref_r, length_c, length_r):
        return ipo_loss(policy_c, policy_r, ref_c, ref_r, self.config.tau)


class SimPOTrainer(Trainer):
    """SimPO: reference-free, length-normalised; no reference log-probs are computed."""

    uses_reference = False

    def pair_loss(self, policy_c, policy_r, ref_c, ref_r, length_c, length_r):
        c = self.config
        return simpo_loss(policy_c, policy_r, length_c, length_r, c.beta, c.gamma, c.sft_weight)

    def reward_metrics(self, chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict[str, float]:
        return {M.SIMPO_CHOSEN_REWARD: chosen_r.mean().item(), M.SIMPO_REJECTED_REWARD: rejected_r.mean().item()}
