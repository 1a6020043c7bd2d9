"""A Bradley-Terry reward model r_φ(x, y), learned from preference pairs.

    p(y+ ≻ y− | x) = σ(r_φ(x, y+) − r_φ(x, y−));   L = −mean log σ(r_φ(x, y+) − r_φ(x, y−))

r_φ is a copy of the base model's transformer trunk with a linear head (no bias: the loss
cannot see a constant) on the hidden state of the last real token of ``prompt ∘ completion``,
the same input the env gives a reward model (no EOS). Pairs come from the task's simulated
annotators on the train prompts; held-out accuracy is measured on pairs built the same way
from the task's eval prompts (other prompts, another seed).

The shared loop trains and checkpoints ``ctx.policy``; this trainer leaves the policy alone
and trains its own model, which lives in its ``state_dict`` (so in the checkpoint's
``trainer_state.pt``). ``Trainer.save_reward_model(path)`` (or ``export_reward_model`` on a
checkpoint) writes it as a Hugging Face sequence classifier that ``rlhf_env.RewardModel``
loads, to be used as an env reward. The formulas: docs/maths.md §11.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_env.algorithms.base import BatchShape, TrainContext
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.plumbing import Optimizer, Stateful, check_optimizer_settings, draw_part
from rlhf_env.errors import SettingError, UnsupportedModelError
from rlhf_env.models import pad_token_id, save_pretrained
from rlhf_env.scoring import encode_completion, pad_batch
from rlhf_env.tasks.base import PreferencePair


@dataclass
class Config:
    # On a checkpoint the user gives (--model): algorithms/run/presets.py
    PRETRAINED: ClassVar[dict] = {"lr": 1e-5}
    PRETRAINED_LORA: ClassVar[dict] = {"lr": 1e-4}
    lr: float = 3e-4
    batch_size: int = 64  # pairs per step
    num_pairs: int = 2048  # training pairs from the annotators on the train prompts
    num_heldout_pairs: int = 256  # pairs on the eval prompts, for rm/heldout_accuracy
    heldout_every: int = 10  # measure held-out accuracy after every k-th step (0: never)
    annotator_tau: float = 0.25  # the simulated annotator's temperature τ
    max_grad_norm: float = 1.0

    def batch_shape(self) -> BatchShape:
        """batch_size pairs, chosen and rejected scored in one forward; no rollout; the ranks split the pairs."""
        return BatchShape(2 * self.batch_size, 0, "batch_size")

    def __post_init__(self):
        check_optimizer_settings(self, "reward model")
        if self.batch_size < 1 or self.num_pairs < 1 or self.num_heldout_pairs < 1:
            raise SettingError(f"reward model batch_size, num_pairs and num_heldout_pairs must be >= 1: {self}")
        if self.heldout_every < 0:
            raise SettingError(f"heldout_every must be >= 0, got {self.heldout_every}")
        if not self.annotator_tau > 0:
            raise SettingError(f"annotator_tau must be > 0, got {self.annotator_tau}")


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−mean log σ(r+ − r−), the Bradley-Terry negative log-likelihood (docs/maths.md §11).

    Args:
        r_chosen, r_rejected: (B,) scores r_φ(x, y+) and r_φ(x, y−).
    Returns:
        a scalar.
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class ScalarRewardModel(nn.Module):
    """A causal LM's trunk (``lm.base_model``, copied) and a linear head on the last real token.

    ``forward(input_ids, attention_mask) -> (B,)`` for right-padded rows.
    """

    def __init__(self, lm):
        super().__init__()
        self.config = copy.deepcopy(lm.config)
        self.trunk = copy.deepcopy(lm.base_model)
        self.head = nn.Linear(self.config.hidden_size, 1, bias=False)
        nn.init.zeros_(self.head.weight)  # every score starts at 0: loss log 2
        self.head.to(next(self.trunk.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.sum(1) - 1  # (B,) index of the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def to_sequence_classifier(self, pad_token_id: int):
        """The same function as a Hugging Face ``*ForSequenceClassification`` with one label."""
        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.config)
        config.num_labels = 1
        config.pad_token_id = pad_token_id
        config.architectures = None
        model = AutoModelForSequenceClassification.from_config(config)
        head = getattr(model, "score", None)
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise UnsupportedModelError(
                f"exporting a reward model as {type(model).__name__} is not supported (needs a bias-free `score` head)"
            )
        model.base_model.load_state_dict(self.trunk.state_dict())
        with torch.no_grad():
            head.weight.copy_(self.head.weight)
        return model.eval()


def encode_scored(tokenizer, prompts: Sequence[str], completions: Sequence[str], prompt_format=None) -> list[list[int]]:
    """prompt ∘ completion ids, as the env hands them to a reward model (no EOS; ``prompt_format``: the
    env's, so a chat template's prompt ids too)."""
    fmt = prompt_format
    return [encode_completion(tokenizer, p, c, eos=False, prompt_format=fmt)[0] for p, c in zip(prompts, completions)]


def heldout_pairs(ctx: TrainContext, n: int, tau: float) -> list[PreferencePair]:
    """``n`` annotator pairs on the task's eval prompts (seed ``ctx.seed + 1``), sampled by ``ctx.generator``."""
    from rlhf_env.tasks.annotators import sample_preference_pairs

    task = dataclasses.replace(ctx.task, train_prompts=ctx.task.eval_prompts)
    return sample_preference_pairs(
        task,
        ctx.ref,
        ctx.tokenizer,
        n,
        tau=tau,
        seed=ctx.seed + 1,
        chat_template=ctx.chat_template,
        desc="held-out pairs",
        generator=ctx.generator,
    )


class Trainer(Stateful):
    state = {"reward_model": "model", "optimizer": "optimizer"}  # checkpoint key -> attribute

    def __init__(self, ctx: TrainContext, config: Config, eval_batch_size: int = 256):
        self.ctx, self.config, self.eval_batch_size = ctx, config, eval_batch_size
        tok = ctx.tokenizer
        self.pad = pad_token_id(tok)
        self.pairs = ctx.task.preference_pairs(
            ctx.ref,
            tok,
            config.num_pairs,
            tau=config.annotator_tau,
            seed=ctx.seed,
            chat_template=ctx.chat_template,
            generator=ctx.generator,
        )
        self.heldout = heldout_pairs(ctx, config.num_heldout_pairs, config.annotator_tau)
        self.chosen, self.rejected = self._encode(self.pairs)
        self.heldout_chosen, self.heldout_rejected = self._encode(self.heldout)
        # Held-out pairs whose gold rewards differ, and which one gold prefers.
        h = self.heldout
        gold_c = torch.tensor(ctx.task.gold_reward([p.prompt for p in h], [p.chosen for p in h]), dtype=torch.float64)
        gold_r = torch.tensor(ctx.task.gold_reward([p.prompt for p in h], [p.rejected for p in h]), dtype=torch.float64)
        self.gold_differs, self.gold_prefers_chosen = gold_c != gold_r, gold_c > gold_r
        self.model = ScalarRewardModel(ctx.ref).train(False)
        self.optimizer = Optimizer(self.model.parameters(), config.lr, config.max_grad_norm)

    def _encode(self, pairs: list[PreferencePair]) -> tuple[list[list[int]], list[list[int]]]:
        tok, prompts = self.ctx.tokenizer, [p.prompt for p in pairs]
        fmt = self.ctx.prompt_format
        chosen = encode_scored(tok, prompts, [p.chosen for p in pairs], fmt)
        return chosen, encode_scored(tok, prompts, [p.rejected for p in pairs], fmt)

    def _scores(self, seqs: list[list[int]]) -> torch.Tensor:
        return self.model(*pad_batch(seqs, self.pad, self.ctx.device))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """(N,) r_φ(x, y) on the CPU."""
        seqs = encode_scored(self.ctx.tokenizer, prompts, completions, self.ctx.prompt_format)
        b = self.eval_batch_size
        return torch.cat([self._scores(seqs[s : s + b]) for s in range(0, len(seqs), b)]).cpu()

    @torch.no_grad()
    def heldout_metrics(self) -> dict[str, float]:
        """Held-out accuracy against the annotators' labels, and against gold where gold has an order."""
        b = self.eval_batch_size
        margins = torch.cat(
            [
                self._scores(self.heldout_chosen[s : s + b]) - self._scores(self.heldout_rejected[s : s + b])
                for s in range(0, len(self.heldout), b)
            ]
        ).cpu()
        out = {M.RM_HELDOUT_ACCURACY: (margins > 0).float().mean().item()}
        if self.gold_differs.any():
            agree = (margins > 0) == self.gold_prefers_chosen
            out[M.RM_HELDOUT_GOLD_ACCURACY] = agree[self.gold_differs].float().mean().item()
        return out

    def step(self, step: int, seed: int) -> dict[str, float]:
        c = self.config
        part = draw_part(len(self.pairs), c.batch_size, seed)
        idx = part.rows.tolist()
        scores = self._scores([self.chosen[i] for i in idx] + [self.rejected[i] for i in idx])  # one forward
        r_chosen, r_rejected = scores[: len(idx)], scores[len(idx) :]
        loss = bt_loss(r_chosen, r_rejected)
        grad_norm = self.optimizer.step(loss, weight=part.weight, reward_model=loss)
        metrics = {
            M.LOSS_REWARD_MODEL: loss.item(),
            M.OPTIM_GRAD_NORM: grad_norm,
            M.RM_ACCURACY: (r_chosen > r_rejected).float().mean().item(),
            M.RM_MARGIN: (r_chosen - r_rejected).mean().item(),
            # every token is scored (the whole sequence feeds the last hidden state)
            M.PERF_TOKENS: float(sum(len(self.chosen[i]) + len(self.rejected[i]) for i in idx)),
        }
        if c.heldout_every and (step + 1) % c.heldout_every == 0:
            metrics.update(self.heldout_metrics())
        return metrics

    def save_reward_model(self, path: str | os.PathLike) -> Path:
        """Write the reward model and tokenizer as a local HF checkpoint ``rlhf_env.RewardModel(path)`` loads."""
        return save_pretrained(self.model.to_sequence_classifier(self.pad), self.ctx.tokenizer, path)


def load_reward_run(checkpoint: str | os.PathLike):
    """``(sequence classifier, tokenizer)``: the r_φ of a ``reward_model`` run's checkpoint directory."""
    from rlhf_env.models import load_causal_lm, load_tokenizer

    checkpoint = Path(checkpoint)
    lm, tok = load_causal_lm(checkpoint, device="cpu"), load_tokenizer(checkpoint)
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
    model = ScalarRewardModel(lm)
    model.load_state_dict(state["trainer"]["reward_model"])
    return model.to_sequence_classifier(pad_token_id(tok)), tok


def export_reward_model(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Turn a ``reward_model`` run's checkpoint directory into a ``RewardModel``-loadable one at ``path``."""
    model, tok = load_reward_run(checkpoint)
    return save_pretrained(model, tok, path)
