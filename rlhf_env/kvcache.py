"""Incremental next-token log-probs for a batch of rows that start and stop independently.

``IncrementalLM`` wraps any Hugging Face causal LM and a ``DynamicCache``. Each call to
``feed`` runs one batched forward for the rows that continue (one token each; rows that
wait feed nothing) and, when some rows restart, one prefill of just their new prompts,
spliced into the shared cache. Positions are explicit per row and the attention mask
hides everything a row must not see (its old episode, padding), so rows never need to be
aligned. Columns that no row can see any more
are squeezed out now and then, which bounds the cache near the longest live sequence.

It serves both the environment (the reference model) and agents (the policy): the same
cache logic, written once.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before the rename (deprecated, removed in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class IncrementalLM:
    """Batched, KV-cached next-token log-probabilities.

    Args:
        model: a Hugging Face causal LM (already on its device, in eval mode).
        batch_size: number of rows ``B``.
        pad_token_id: id fed in padding slots (never attended to).
    """

    def __init__(self, model, batch_size: int, pad_token_id: int = 0):
        self.model = model
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # (B, T)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,)
        # (B, V) float32 log-probs of the next token of each row, from the last feed.
        self.next_logprobs: torch.Tensor | None = None

    @torch.inference_mode()
    def feed(self, chunk: torch.Tensor, lengths: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """Append ``chunk[i, :lengths[i]]`` to row ``i`` and return next-token log-probs.

        Continuing rows go through one batched forward; rows that restart (fewer than all)
        are prefilled as their own sub-batch, so a few new prompts do not make every row
        compute a prompt-wide chunk.

        Args:
            chunk: (B, P) int64 token ids, right-padded.
            lengths: (B,) int64, real tokens per row in ``chunk``; 0 leaves the row as it is.
            restart: (B,) bool, rows that forget their history before this chunk
                (their ``lengths`` must be >= 1).

        Returns:
            (B, V) float32 log-probs of each row's next token (unchanged for 0-length rows).
        """
        chunk, lengths, restart = chunk.to(self.device), lengths.to(self.device), restart.to(self.device)
        if bool((restart & (lengths < 1)).any()):
            raise ValueError("a restarted row needs at least one token")
        if self.cache is None or bool(restart.all()):
            self.cache, self.next_logprobs = DynamicCache(), None
            self.mask = self.mask[:, :0]
            self.positions = torch.zeros_like(self.positions)
            self._append(chunk, lengths)
        else:
            going_on = torch.where(restart, 0, lengths)
            if bool(going_on.any()):
                # Restarting rows still see their old history here, so their padding
                # queries are not left with nothing to attend to.
                self._append(chunk[:, : int(going_on.max())], going_on)
            if bool(restart.any()):
                self._prefill(restart.nonzero().squeeze(1), chunk, lengths)
        self._compact()
        return self.next_logprobs

    def _attention_mask(self, past: int, width: int) -> torch.Tensor:
        """The mask for ``width`` new queries after ``past`` cached columns.

        Built here rather than by transformers from the 2-D mask, which costs more than
        the forward of a small model. Causal by column, limited to each row's visible
        columns; every query also sees its own column, so no attention row is empty
        (an empty row would put NaNs into the cache).
        """
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            return self.mask  # let transformers build what its kernel needs
        q = past + torch.arange(width, device=self.device)
        k = torch.arange(past + width, device=self.device)
        allowed = (self.mask.bool()[:, None, :] & (k[None, :] <= q[:, None])[None]) | (k[None, :] == q[:, None])[None]
        allowed = allowed[:, None]  # (B, 1, width, past + width)
        if impl == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _forward(self, chunk: torch.Tensor, lengths: torch.Tensor, cache: DynamicCache, positions: torch.Tensor):
        """One forward of a right-padded chunk on ``cache``; returns (rows, V) log-probs."""
        rows, width = chunk.shape
        offsets = torch.arange(width, device=self.device)
        visible = (offsets[None, :] < lengths[:, None]).long()
        past = self.mask.shape[1] - width  # the caller has already appended ``visible``
        out = self.model(
            input_ids=chunk.masked_fill(visible == 0, self.pad_token_id),
            attention_mask=self._attention_mask(past, width),
            position_ids=positions[:, None] + offsets[None, :],
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        last = (lengths - 1).clamp(min=0)
        return torch.log_softmax(out.logits[torch.arange(rows, device=self.device), last].float(), dim=-1)

    def _append(self, chunk: torch.Tensor, lengths: torch.Tensor) -> None:
        """Every row gets ``chunk.shape[1]`` new columns, visible up to its length."""
        visible = (torch.arange(chunk.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        self.mask = torch.cat([self.mask, visible], dim=1)
        new = self._forward(chunk, lengths, self.cache, self.positions)
        fed = lengths > 0
        self.next_logprobs = new if self.next_logprobs is None else torch.where(fed[:, None], new, self.next_logprobs)
        self.positions += lengths

    def _prefill(self, rows: torch.Tensor, chunk: torch.Tensor, lengths: torch.Tensor) -> None:
        """Start ``rows`` afresh: prefill their prompts alone, then splice into the cache."""
        width = int(lengths[rows].max())
        sub_chunk, sub_len = chunk[rows, :width], lengths[rows]
        visible = (torch.arange(width, device=self.device)[None, :] < sub_len[:, None]).long()
        shared_mask, self.mask = self.mask, visible  # the sub-batch sees only its own columns
        sub_cache = DynamicCache()
        new = self._forward(sub_chunk, sub_len, sub_cache, torch.zeros_like(sub_len))
        # Splice: ``width`` new columns for every row, visible only to the restarted ones.
        self.mask = shared_mask
        self.mask[rows] = 0
        columns = torch.zeros(self.batch_size, width, dtype=self.mask.dtype, device=self.device)
        columns[rows] = visible
        self.mask = torch.cat([self.mask, columns], dim=1)
        for layer, sub in zip(self.cache.layers, sub_cache.layers):
            for name in ("keys", "values"):
                big = getattr(layer, name)
                cols = big.new_zeros(big.shape[0], big.shape[1], width, big.shape[3])
                cols[rows] = getattr(sub, name)
                setattr(layer, name, torch.cat([big, cols], dim=2))
        self.next_logprobs = self.next_logprobs.clone()
        self.next_logprobs[rows] = new
        self.positions[rows] = sub_len

    def _compact(self) -> None:
        """Repack the cache once half of it (and at least 64 columns) is hidden from some row.

        Rows start at different times, so one row's prompt columns are padding for the
        others. Each row's visible columns are moved, in order, to the right end; order
        among a row's keys is all attention needs, since positions are explicit.
        """
        visible = self.mask.bool()
        width = int(visible.sum(dim=1).max())
        if self.mask.shape[1] - width < max(64, self.mask.shape[1] // 2):
            return
        # Stable sort puts each row's hidden columns first and its visible ones last, in order.
        index = torch.argsort(visible.to(torch.int8), dim=1, stable=True)[:, -width:]  # (B, width)
        self.mask = torch.gather(self.mask, 1, index)
        for layer in self.cache.layers:
            H, D = layer.keys.shape[1], layer.keys.shape[3]
            kv_index = index[:, None, :, None].expand(-1, H, -1, D)
            layer.keys = torch.gather(layer.keys, 2, kv_index)
            layer.values = torch.gather(layer.values, 2, kv_index)

    @property
    def cache_len(self) -> int:
        return self.mask.shape[1]
