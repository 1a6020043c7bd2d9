"""Log-probs of given tokens from the final hidden states and the output head, a chunk of tokens at a time.

A plain forward materialises the logits of every position, (B, T, V), and the log-softmax
makes float32 copies of them (and, with gradients, keeps them for backward): at V = 49k,
B·T = 4k tokens that is 0.8 GB per copy. ``OutputHead`` instead runs the model's trunk
(``get_decoder()``), and applies the output head (``get_output_embeddings()``) and the
log-softmax to ``chunk_tokens`` hidden states at a time; with gradients each chunk runs under
``torch.utils.checkpoint``, so its logits are recomputed in backward instead of kept. The peak
then holds one chunk's logits (``LOGPROB_CHUNK_BYTES`` of float32), whatever B·T is.

The result equals the plain forward's up to float rounding (the same operations, on fewer rows
at a time) where ``output_head`` accepts the model: a Hugging Face ``PreTrainedModel`` whose
``forward`` is its class's (not replaced on the instance, e.g. by LoRA's reference wrapper) and
without hooks on it (FSDP2's all-gathers, accelerate's device hooks), whose logits are the head's
output times ``logit_scale`` (Cohere), over ``config.logits_scaling`` (Granite), soft-capped by
``config.final_logit_softcapping`` (Gemma 2/3) or none of these. That is checked once per model
by a probe: a 4-token forward both ways must agree; a model that fails it (an architecture that
transforms its logits in some other way) is run whole. Callers take the chunked path only when the
logits would exceed one chunk (``chunked_head``), so small models run exactly as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

LOGPROB_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk; tests lower it to force chunks


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


_heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OutputHead | None (the probe's verdict)


def _logit_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the architecture's ``forward`` does to the head's output (the ones transformers ships)."""
    config = model.config
    scale = getattr(model, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)):
            logits = logits * scale
        if isinstance(divide, (int, float)) and divide != 1:
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class OutputHead:
    """A causal LM split into its trunk and its output head (see the module docstring)."""

    def __init__(self, model):
        # No reference to ``model`` itself: ``_heads`` is keyed weakly by it, and a value holding its key
        # would keep every model alive (a bench worker grew by a policy and a reference per cell).
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.transform = _logit_transform(model)
        self.vocab = self.head.out_features if hasattr(self.head, "out_features") else model.config.vocab_size

    def hidden(self, **forward) -> torch.Tensor:
        """(B, T, H) final hidden states (what the head reads) of a forward with ``forward``'s arguments."""
        return self.decoder(**forward).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) logits, as the model's own forward gives them, of (..., H) hidden states."""
        return self.transform(self.head(hidden))

    def chunk_tokens(self) -> int:
        return max(1, LOGPROB_CHUNK_BYTES // (4 * self.vocab))

    def logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """``token_logprobs(logits(hidden), labels, vocab_size)`` a chunk of tokens at a time.

        Args:
            hidden: (..., H) hidden states.
            labels: (...) int64 token ids, one per hidden state.
        Returns:
            (...) float32 log-probs; with gradients, each chunk's logits are recomputed in backward.
        """

        def chunk(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return token_logprobs(self.logits(h), y, vocab_size)

        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        keep_graph = torch.is_grad_enabled()
        parts = []
        for h, y in zip(flat_h.split(self.chunk_tokens()), flat_y.split(self.chunk_tokens())):
            if keep_graph:  # the chunk's logits are dropped after forward and recomputed in backward
                parts.append(checkpoint(chunk, h, y, use_reentrant=False, preserve_rng_state=False))
            else:
                parts.append(chunk(h, y))
        if not parts:
            return torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        return torch.cat(parts).view(labels.shape)


def _accepts(model) -> bool:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or "forward" in vars(model):
        return False  # not a plain HF model, or its forward is wrapped (LoRA's reference)
    if model._forward_hooks or model._forward_pre_hooks:
        return False  # FSDP2 gathers the root's weights in a hook the trunk alone would skip
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return False
    return isinstance(decoder, torch.nn.Module) and decoder is not model and isinstance(head, torch.nn.Module)


@torch.no_grad()
def _probe(model) -> OutputHead | None:
    """The model's ``OutputHead`` if a 4-token forward through it gives the model's own logits."""
    if not _accepts(model):
        return None
    try:
        head = OutputHead(model)
        device = next(model.parameters()).device
        ids = (torch.arange(4, device=device) % head.vocab)[None]
        full = model(input_ids=ids, use_cache=False).logits.float()
        mine = head.logits(head.hidden(input_ids=ids, use_cache=False)).float()
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return None
    if full.shape != mine.shape:
        return None
    tol = 1e-3 * (1.0 + float(full.abs().max()))
    return head if bool(((full - mine).abs() <= tol).all()) else None


def output_head(model) -> OutputHead | None:
    """``model``'s ``OutputHead``, or None when log-probs must come from its whole forward (checked once per model)."""
    try:
        return _heads[model]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable
        return None
    head = _probe(model)
    _heads[model] = head
    return head


def chunked_head(model, tokens: int) -> OutputHead | None:
    """The ``OutputHead`` to use for log-probs at ``tokens`` positions: only when their float32 logits
    would take more than one chunk (``LOGPROB_CHUNK_BYTES``) and the model allows it; None: the plain path."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or tokens * vocab * 4 <= LOGPROB_CHUNK_BYTES:
        return None
    return output_head(model)
