"""Incremental next-token log-probs for a batch of rows that start and stop independently.

``IncrementalLM`` wraps any Hugging Face causal LM and a ``DynamicCache``. Each call to
``feed`` runs **one** batched forward over a right-padded chunk: one token for rows that
continue, a whole prompt for rows that restart, nothing for rows that wait. Positions are
explicit per row and the 2-D attention mask hides everything a row must not see (its old
episode, padding), so rows never need to be aligned. Columns that no row can see any more
are squeezed out now and then, which bounds the cache near the longest live sequence.

It serves both the environment (the reference model) and agents (the policy): the same
cache logic, written once.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


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
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # (B, T)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,)
        # (B, V) float32 log-probs of the next token of each row, from the last feed.
        self.next_logprobs: torch.Tensor | None = None

    @torch.inference_mode()
    def feed(self, chunk: torch.Tensor, lengths: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """Append ``chunk[i, :lengths[i]]`` to row ``i`` and return next-token log-probs.

        Args:
            chunk: (B, P) int64 token ids, right-padded.
            lengths: (B,) int64, real tokens per row in ``chunk``; 0 leaves the row as it is.
            restart: (B,) bool, rows that forget their history before this chunk
                (their ``lengths`` must be >= 1).

        Returns:
            (B, V) float32 log-probs of each row's next token (unchanged for 0-length rows).
        """
        B, P = chunk.shape
        chunk = chunk.to(self.device)
        lengths = lengths.to(self.device)
        restart = restart.to(self.device)
        if bool((restart & (lengths < 1)).any()):
            raise ValueError("a restarted row needs at least one token")
        if self.cache is None or bool(restart.all()):
            self.cache = None
            self.mask = self.mask[:, :0]
            self.positions = torch.zeros_like(self.positions)
        else:
            self.mask[restart] = 0
            self.positions[restart] = 0

        offsets = torch.arange(P, device=self.device)
        chunk_mask = (offsets[None, :] < lengths[:, None]).long()  # (B, P)
        self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        position_ids = self.positions[:, None] + offsets[None, :]
        if self.cache is None:
            self.cache = DynamicCache()
        out = self.model(
            input_ids=chunk.masked_fill(chunk_mask == 0, self.pad_token_id),
            attention_mask=self.mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        last = (lengths - 1).clamp(min=0)
        logits = out.logits[torch.arange(B, device=self.device), last].float()
        new = torch.log_softmax(logits, dim=-1)
        fed = lengths > 0
        if self.next_logprobs is None or bool(fed.all()):
            self.next_logprobs = new
        else:
            self.next_logprobs = torch.where(fed[:, None], new, self.next_logprobs)
        self.positions += lengths
        self._compact()
        return self.next_logprobs

    def _compact(self) -> None:
        """Repack the cache once a quarter of it is columns a row cannot see.

        Rows start at different times, so one row's prompt columns are padding for the
        others. Each row's visible columns are moved, in order, to the right end; order
        among a row's keys is all attention needs, since positions are explicit.
        """
        visible = self.mask.bool()
        width = int(visible.sum(dim=1).max())
        if self.mask.shape[1] - width < max(16, self.mask.shape[1] // 4):
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
