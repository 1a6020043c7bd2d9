"""Rewards: plain callables on text, or a Hugging Face reward model scored in batches.

A reward is anything ``reward(prompts: list[str], completions: list[str]) -> scores``
(a sequence or tensor of floats, one per completion). ``RewardModel`` wraps a
sequence-classification model with one label; when its tokenizer is the policy's, the
env hands it token ids directly instead of decoding and re-tokenising text.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rlhf_env.errors import RewardError, SettingError
from rlhf_env.models import check_vocab, load_reward_model, load_tokenizer, pad_token_id
from rlhf_env.scoring import pad_batch

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardModel:
    """A scalar reward model ``r_φ(x, y)``: the single logit of a sequence classifier.

    Args:
        model: a ``*ForSequenceClassification`` model with ``num_labels == 1``, or a local path.
        tokenizer: its tokenizer (or a path); loaded from ``model`` when that is a path.
        device, dtype: where to run it (default: CUDA if present, else CPU; model dtype).
    """

    def __init__(self, model, tokenizer=None, device=None, dtype=None, trust_remote_code: bool = False):
        if tokenizer is None:
            if not isinstance(model, (str, os.PathLike)):
                raise SettingError("RewardModel needs the reward model's tokenizer")
            tokenizer = model
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.model = load_reward_model(model, device, dtype, trust_remote_code)
        self.tokenizer = tokenizer
        check_vocab(tokenizer, self.model, "reward model")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            # Sequence classifiers find the last real token by the pad id: it must not be a real token.
            raise SettingError("the reward model's tokenizer has neither a pad nor an EOS token")
        self.pad_token_id = pad_token_id(tokenizer)
        # Sequence classifiers read the last non-pad token; they need to know the pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.pad_token_id
        self.device = next(self.model.parameters()).device

    def shares_vocab_with(self, tokenizer) -> bool:
        """True when ``tokenizer`` maps text to the same ids, so ids can be passed through."""
        return tokenizer is self.tokenizer or tokenizer.get_vocab() == self.tokenizer.get_vocab()

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Score token sequences (prompt ∘ completion ids) in one batch; returns (N,) float32."""
        ids, mask = pad_batch(sequences, self.pad_token_id, self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[:, 0].float().cpu()

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        enc = self.tokenizer([p + c for p, c in zip(prompts, completions)])
        return self.score_ids(enc["input_ids"])


def reward_name(reward) -> str:
    """How messages name a reward: ``module.function`` (or its class), or the reward model's class."""
    if isinstance(reward, RewardModel):
        return f"reward model {type(reward.model).__name__}"
    label = getattr(reward, "rlhf_name", None)  # the name it was chosen by (``--reward completion_length``)
    if label:
        return repr(label)
    fn = getattr(reward, "func", reward)  # a functools.partial names its function
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}" if module else name


def call_reward(reward, prompts: list[str], completions: list[str]):
    """``reward(prompts, completions)``; an exception it raises becomes a ``RewardError`` that names it.

    Without the name, a reward's bug deep inside a training step reads as the library's own.
    """
    try:
        return reward(prompts, completions)
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"reward {reward_name(reward)} raised {type(exc).__name__}: {exc}") from exc


def as_scores(raw, n: int, name: str = "") -> torch.Tensor:
    """Check a reward's output: ``n`` finite numbers, returned as a (n,) float32 CPU tensor.

    ``name`` (see ``reward_name``) is said in the errors, so a user knows whose reward to fix.
    """
    who = f"the reward {name}" if name else "the reward"
    need = "a reward returns one number per completion"
    if raw is None or isinstance(raw, (str, bytes)):
        raise RewardError(f"{who} returned {type(raw).__name__} {raw!r}; {need}")
    if isinstance(raw, (list, tuple)):
        # Strings are not read as numbers, even "0.5": a reward that returns text has a bug.
        for row, value in enumerate(raw):
            if not isinstance(value, (numbers.Real, np.bool_)) and not (torch.is_tensor(value) and value.numel() == 1):
                raise RewardError(f"{who} returned {type(value).__name__} {value!r} at row {row}; {need}")
    try:
        scores = torch.as_tensor(raw, dtype=torch.float32).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RewardError(f"{who} returned {type(raw).__name__}, not numbers ({exc}); {need}") from exc
    if scores.numel() != n:
        raise RewardError(f"{who} returned {scores.numel()} scores for {n} completions")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{who} returned non-finite scores at rows {bad}: {scores[bad].tolist()}")
    return scores


# -- simple programmatic rewards (registered as built-in plugins) ----------------------


def letter_fraction(letter: str = "e") -> RewardFn:
    """Score = share of the completion's characters equal to ``letter`` (0 if empty)."""
    if not isinstance(letter, str) or len(letter) != 1:
        raise SettingError(f"letter must be a single character, got {letter!r}")

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [c.count(letter) / len(c) if c else 0.0 for c in completions]

    return reward


def completion_length(max_chars: int = 32) -> RewardFn:
    """Score = completion length in characters divided by ``max_chars``, capped at 1."""
    # Checked here, where the option is chosen, not at the first step (a division by zero).
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise SettingError(f"max_chars must be an integer >= 1 (the length that scores 1), got {max_chars!r}")

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [min(len(c), max_chars) / max_chars for c in completions]

    return reward
