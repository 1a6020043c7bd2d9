"""Log-probs of given tokens under a causal LM: the shared primitive of SFT, DPO and scoring.

``sft_loss`` lives here, in the env layer, because the env layer builds the tasks' base
models with it; the ``sft`` algorithm imports it from here (downward), and DPO scores
completions the same way (prompt, completion, EOS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_env.models import pad_token_id


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """log softmax(logits[..., :vocab_size])[labels], in float32.

    Args:
        logits: (..., V) unnormalised scores.
        labels: (...) int64 token ids.
        vocab_size: the tokenizer's size when the model pads its vocabulary beyond it
            (the softmax then runs over the ids the tokenizer can produce, as the sampler's
            does); None: all V.
    Returns:
        (...) float32 log-probs.
    """
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def next_token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Log-prob of every token given the ones before it, for right-padded sequences.

    Args:
        input_ids: (B, T) int64, right-padded.
        attention_mask: (B, T) 0/1.
        vocab_size: see ``token_logprobs``.
    Returns:
        (B, T-1) float32: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]).
    """
    # No KV cache: a training forward would otherwise build one and throw it away.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size)


def shares_prompts(model) -> bool:
    """Whether ``branch_logprobs`` can run ``model``: explicit 4-D masks and ``position_ids``
    (``kvcache.layer_windows``' conditions)."""
    from rlhf_env.kvcache import UnsupportedModelError, layer_windows

    try:
        layer_windows(model)
    except UnsupportedModelError:
        return False
    return True


def branch_logprobs(
    model, input_ids: torch.Tensor, segments: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Log-probs of several completions of one prompt scored in one row, the prompt run once.

    A row is ``prompt ∘ branch 1 ∘ branch 2 ∘ …`` then padding. Branch k's tokens sit at the
    positions they would have right after the prompt and attend to the prompt and to their
    own branch only, so each branch is scored exactly as the row ``prompt ∘ branch k`` would
    be (``next_token_logprobs``), in one forward and without running the prompt again.

    Args:
        input_ids: (B, W) int64.
        segments: (B, W) int64: 0 on the prompt (at least one token), k >= 1 on branch k
            (contiguous), -1 on padding (at the end).
        vocab_size: see ``token_logprobs``.
    Returns:
        (B, W) float32: at a branch column, log p(token | prompt, the branch before it); 0 elsewhere.
    """
    from rlhf_env.fastgen import attention_masks
    from rlhf_env.kvcache import layer_windows

    B, W = input_ids.shape
    cols = torch.arange(W, device=input_ids.device)[None, :]
    prompt, branch = segments == 0, segments > 0
    P = prompt.sum(1, keepdim=True)  # (B, 1) prompt lengths
    after = torch.cat([torch.zeros_like(branch[:, :1]), segments[:, 1:] != segments[:, :-1]], 1)
    starts = branch & after  # each branch's first column
    start_col = torch.where(starts, cols, 0).cummax(1).values
    positions = torch.where(branch, P + cols - start_col, torch.where(prompt, cols, 0))
    # Padding queries see the prompt's first token only (a row with no allowed key would be NaN).
    related = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    kernel = model.config._attn_implementation
    mask = attention_masks(layer_windows(model), segments >= 0, positions, positions, kernel, model.dtype, related)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    # Column c predicts column c + 1, except that a later branch's first token is predicted by
    # the prompt's last column: those few are gathered apart.
    logp = torch.cat(
        [
            torch.zeros_like(logits[:, :1, 0], dtype=torch.float32),
            token_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size),
        ],
        1,
    )
    rows, at = torch.nonzero(starts & (cols > P), as_tuple=True)
    if len(rows):
        firsts = token_logprobs(logits[rows, P[rows, 0] - 1], input_ids[rows, at], vocab_size)
        logp = logp.index_put((rows, at), firsts)
    return logp * branch


def pack(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``, both (N, max_len) int64."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def encode_completion(tokenizer, prompt: str, completion: str, eos: bool = True) -> tuple[list[int], int]:
    """``(ids, prompt_length)``: ``tokenizer(prompt)`` then the completion's ids (and EOS)."""
    if eos and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so a completion cannot be ended")
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return p + c + ([tokenizer.eos_token_id] if eos else []), len(p)


def pack_completions(encoded: Sequence[tuple[list[int], int]], pad_token_id: int, device=None):
    """Right-pad encoded (ids, prompt_length) rows.

    Returns:
        ``(input_ids, attention_mask, completion_mask)``: (B, T), (B, T) and (B, T-1) float,
        the last in ``next_token_logprobs`` coordinates (entry t is 1 when token t+1 is a
        completion token).
    """
    ids, attn = pack([e[0] for e in encoded], pad_token_id, device)
    T = ids.shape[1]
    pos = torch.arange(1, T, device=ids.device)[None, :]
    starts = torch.tensor([e[1] for e in encoded], device=ids.device)[:, None]
    completion_mask = ((pos >= starts) & attn[:, 1:].bool()).float()
    return ids, attn, completion_mask


def sft_loss(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean NLL of ``completion + EOS`` given ``prompt``, over the batch's completion tokens (docs/maths.md §10).

    Prompt tokens and padding are masked out; the mean is per token, not per example.
    """
    device = next(model.parameters()).device
    encoded = [encode_completion(tokenizer, p, c) for p, c in pairs]
    ids, attn, target = pack_completions(encoded, pad_token_id(tokenizer), device)
    logp = next_token_logprobs(model, ids, attn, len(tokenizer))  # (B, T-1), entry t predicts token t+1
    return -(logp * target).sum() / target.sum()
