"""Log-probs of given tokens under a causal LM: the shared primitive of SFT, DPO and scoring.

``sft_loss`` lives here, in the env layer, because the env layer builds the tasks' base
models with it; the ``sft`` algorithm imports it from here (downward), and DPO scores
completions the same way (prompt, completion, EOS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_env.lmhead import chunked_head, token_logprobs
from rlhf_env.models import pad_token_id
from rlhf_env.prompt_format import PromptFormat


def next_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Log-prob of every token given the ones before it, for right-padded sequences.

    Args:
        input_ids: (B, T) int64, right-padded.
        attention_mask: (B, T) 0/1.
        vocab_size: see ``token_logprobs``.
    Returns:
        (B, T-1) float32: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]). Logits larger
        than one chunk are never materialised whole (``rlhf_env.lmhead``).
    """
    # No KV cache: a training forward would otherwise build one and throw it away.
    forward = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    head = chunked_head(model, input_ids.numel())
    if head is not None:  # large vocabularies: the head and log-softmax a chunk of tokens at a time
        return head.logprobs(head.hidden(**forward)[:, :-1], input_ids[:, 1:], vocab_size)
    logits = model(**forward).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size)


def pad_batch(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``, both (N, max_len) int64."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def encode_completion(
    tokenizer, prompt: str, completion: str, eos: bool = True, prompt_format: PromptFormat | None = None
) -> tuple[list[int], int]:
    """``(ids, prompt_length)``: the prompt's ids, the completion's ids, and (``eos``) what ends it.

    Without ``prompt_format``: ``tokenizer(prompt)`` and the EOS, raw text. With one (the env's
    ``prompt_format``, ``TrainContext.prompt_format``): its ``encode_completion``, so under a chat
    template the ids are the template's prompt, the completion and the end-of-turn token,
    exactly what the env holds after a policy sampled that completion.
    """
    fmt = prompt_format or PromptFormat(tokenizer, "none")
    return fmt.encode_completion(prompt, completion, end=eos)


def pack_completions(encoded: Sequence[tuple[list[int], int]], pad_token_id: int, device=None):
    """Right-pad encoded (ids, prompt_length) rows.

    Returns:
        ``(input_ids, attention_mask, completion_mask)``: (B, T), (B, T) and (B, T-1) float,
        the last in ``next_token_logprobs`` coordinates (entry t is 1 when token t+1 is a
        completion token).
    """
    ids, attn = pad_batch([e[0] for e in encoded], pad_token_id, device)
    T = ids.shape[1]
    pos = torch.arange(1, T, device=ids.device)[None, :]
    starts = torch.tensor([e[1] for e in encoded], device=ids.device)[:, None]
    completion_mask = ((pos >= starts) & attn[:, 1:].bool()).float()
    return ids, attn, completion_mask


def sft_loss(
    model, tokenizer, pairs: Sequence[tuple[str, str]], prompt_format: PromptFormat | None = None
) -> torch.Tensor:
    """Mean NLL of ``completion + EOS`` given ``prompt``, over the batch's completion tokens (docs/maths.md §10).

    Prompt tokens and padding are masked out; the mean is per token, not per example.
    ``prompt_format``: encode as ``encode_completion`` does with it (chat template, end of turn).
    """
    device = next(model.parameters()).device
    encoded = [encode_completion(tokenizer, p, c, prompt_format=prompt_format) for p, c in pairs]
    ids, attn, target = pack_completions(encoded, pad_token_id(tokenizer), device)
    logp = next_token_logprobs(model, ids, attn, len(tokenizer))  # (B, T-1), entry t predicts token t+1
    return -(logp * target).sum() / target.sum()
