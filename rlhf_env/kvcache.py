"""Incremental next-token log-probs for a batch of rows that start and stop independently.

``IncrementalLM`` wraps any Hugging Face causal LM and a ``DynamicCache``. Each call to
``feed`` runs one batched forward for the rows that continue (one token each; rows that
wait feed nothing) and, when some rows restart, one prefill of just their new prompts,
spliced into the shared cache. Positions are explicit per row and the attention mask
hides everything a row must not see (its old episode, padding, keys outside a sliding
window), so rows never need to be aligned. Columns that no row can see any more
are squeezed out now and then, which bounds the cache near the longest live sequence.

Because the cache builds its own 4-D masks, it serves the models whose attention it can
describe exactly: 'sdpa' or 'eager' kernels, full and sliding-window layers, positions
given by ``position_ids``. Anything else is refused at construction (``check_servable``).

It serves both the environment (the reference model) and agents (the policy): the same
cache logic, written once.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from rlhf_env.errors import UnsupportedModelError
from rlhf_env.lmhead import chunked_head

MASK_KERNELS = ("sdpa", "eager")  # attention kernels that take an explicit 4-D mask


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before the rename (deprecated, removed in 5.40)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_windows(model) -> dict[str, int | None]:
    """``{layer type: sliding window or None}`` for the attention layers of ``model``.

    One entry when every layer attends alike (the model then takes one 4-D mask); several
    for models that mix full and sliding-window layers (Gemma 2/3, Qwen2 with
    ``use_sliding_window``), which take ``{"full_attention": m, "sliding_attention": m}``.
    Raises ``UnsupportedModelError`` for attention this cache cannot reproduce.
    """
    config = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in MASK_KERNELS:
        raise UnsupportedModelError(
            f"{name} uses attention implementation {impl!r}; the KV cache passes explicit 4-D masks, "
            f"which only {' and '.join(map(repr, MASK_KERNELS))} take: load it with attn_implementation='sdpa'"
        )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise UnsupportedModelError(f"{name} takes no position_ids, so rows cannot sit at their own positions")
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(f"{name} uses ALiBi position biases, which ignore position_ids")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name} has use_bidirectional_attention=True: not a causal LM")
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"]
    out: dict[str, int | None] = {}
    for kind in kinds:
        if kind not in ("full_attention", "sliding_attention"):
            raise UnsupportedModelError(
                f"{name} has {kind!r} layers (config.layer_types); the env serves full and "
                "sliding-window attention layers only"
            )
        if kind == "sliding_attention" and not window:
            raise UnsupportedModelError(f"{name} has sliding-attention layers but no config.sliding_window")
        out[kind] = int(window) if kind == "sliding_attention" else None
    return out


def shared_rows(ids: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows holding the same history (a GRPO group's copies of one prompt), so each is prefilled once.

    Args:
        ids: (B, P) int64 token ids.
        real: (B, P) bool, the columns that hold a row's tokens (the rest is padding, wherever it sits).

    Returns:
        ``(first (U,), inverse (B,))``: one row of each distinct history and, per row, the index
        of its history in ``first`` (row ``first[inverse[i]]`` holds row i's tokens in the same
        columns); None when all B histories differ, so callers keep their plain path.
    """
    key = torch.where(real, ids, -1)  # padding compares equal whatever id it holds
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(distinct) == len(ids):
        return None
    rows = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(distinct),), len(ids), dtype=torch.long, device=ids.device)
    return first.scatter_reduce_(0, inverse, rows, "amin"), inverse


class IncrementalLM:
    """Batched, KV-cached next-token log-probabilities.

    Args:
        model: a Hugging Face causal LM (already on its device, in eval mode).
        batch_size: number of rows ``B``.
        pad_token_id: id fed in padding slots (never attended to).
        vocab_size: only the first ``vocab_size`` logits count (the tokenizer's ids; a
            model may pad its embedding beyond them); default all of them.
    """

    def __init__(self, model, batch_size: int, pad_token_id: int = 0, vocab_size: int | None = None):
        self.model = model
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)
        self._windows = layer_windows(model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # (B, T)
        self.column_pos = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # (B, T) positions
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # (B,)
        self.compactions = 0  # how many times the cache was repacked
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
            # No config: a config would give sliding layers a cache that crops old keys by
            # column, but rows are not column-aligned; the mask applies windows by position.
            self.cache, self.next_logprobs = DynamicCache(), None
            self.mask, self.column_pos = self.mask[:, :0], self.column_pos[:, :0]
            self.positions = torch.zeros_like(self.positions)
            self._append_shared(chunk, lengths)
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

    def _attention_mask(self, past: int, width: int, positions: torch.Tensor):
        """The mask(s) for ``width`` new queries after ``past`` cached columns.

        Built here rather than by transformers from a 2-D mask, which costs more than the
        forward of a small model and could not express rows that are not column-aligned.
        Key k is allowed to query q when the row can see k and, by position,
        0 <= pos(q) - pos(k) < window (no window for full layers); every query also sees
        its own column, so no attention row is empty (an empty row would put NaNs into
        the cache). One 4-D mask, or ``{layer type: mask}`` for models mixing layer types.

        Args:
            positions: (B,) position of each row's first new query.
        """
        q_pos = positions[:, None] + torch.arange(width, device=self.device)  # (B, width)
        gap = q_pos[:, :, None] - self.column_pos[:, None, :]  # (B, width, past + width)
        q = past + torch.arange(width, device=self.device)
        own = (torch.arange(past + width, device=self.device)[None, :] == q[:, None])[None]
        seen = self.mask.bool()[:, None, :] & (gap >= 0)
        masks = {}
        for kind, window in self._windows.items():
            allowed = (seen & (gap < window) if window else seen) | own
            masks[kind] = self._kernel_mask(allowed[:, None])  # (B, 1, width, past + width)
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _kernel_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean for sdpa; additive (0 or the dtype's minimum) for eager."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _forward(
        self,
        chunk: torch.Tensor,
        lengths: torch.Tensor,
        cache: DynamicCache,
        positions: torch.Tensor,
        targets: torch.Tensor | None = None,
    ):
        """One forward of a right-padded chunk on ``cache``; returns (rows, V) log-probs of the
        next token, and with ``targets`` (rows, width) also (rows, width) log p(targets[:, j]) after
        position j (the log-probs of a whole chunk in the one forward)."""
        rows, width = chunk.shape
        offsets = torch.arange(width, device=self.device)
        visible = (offsets[None, :] < lengths[:, None]).long()
        past = self.mask.shape[1] - width  # the caller has already appended ``visible`` and its positions
        last = (lengths - 1).clamp(min=0)
        forward = {
            "input_ids": chunk.masked_fill(visible == 0, self.pad_token_id),
            "attention_mask": self._attention_mask(past, width, positions),
            "position_ids": positions[:, None] + offsets[None, :],
            "use_cache": True,
            self._cache_kwarg: cache,
        }
        # Large vocabularies: a scored chunk's log-probs from its hidden states, a chunk of tokens at a time
        # (the trunk must take the cache under the same name, or it would be dropped into **kwargs).
        head = chunked_head(self.model, rows * width) if targets is not None else None
        if head is not None and self._cache_kwarg in inspect.signature(head.decoder.forward).parameters:
            hidden = head.hidden(**forward)
            logits = head.logits(hidden[torch.arange(rows, device=self.device), last])[:, : self.vocab_size]
            return torch.log_softmax(logits.float(), dim=-1), head.logprobs(hidden, targets, self.vocab_size)
        keep = {}
        if targets is None and width > 1 and self._keeps_logits:
            # Only the columns that hold some row's last token: a prompt's other logits are never read.
            columns = torch.unique(last)
            keep, last = {"logits_to_keep": columns}, torch.searchsorted(columns, last)
        out = self.model(**forward, **keep)
        logits = out.logits[torch.arange(rows, device=self.device), last, : self.vocab_size]
        next_lp = torch.log_softmax(logits.float(), dim=-1)
        if targets is None:
            return next_lp
        all_lp = torch.log_softmax(out.logits[..., : self.vocab_size].float(), dim=-1)  # (rows, width, V)
        return next_lp, all_lp.gather(2, targets[..., None]).squeeze(2)

    def _append(self, chunk: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor | None = None):
        """Every row gets ``chunk.shape[1]`` new columns, visible up to its length.

        Returns the (B, width) log-probs of ``targets`` when given (see ``_forward``)."""
        offsets = torch.arange(chunk.shape[1], device=self.device)
        visible = (offsets[None, :] < lengths[:, None]).long()
        self.mask = torch.cat([self.mask, visible], dim=1)
        self.column_pos = torch.cat([self.column_pos, self.positions[:, None] + offsets[None, :]], dim=1)
        new = self._forward(chunk, lengths, self.cache, self.positions, targets)
        new, scored = new if targets is not None else (new, None)
        fed = lengths > 0
        self.next_logprobs = new if self.next_logprobs is None else torch.where(fed[:, None], new, self.next_logprobs)
        self.positions += lengths
        return scored

    def _append_shared(self, chunk: torch.Tensor, lengths: torch.Tensor) -> None:
        """``_append`` on an empty cache, each distinct history forwarded once and its cache rows copied
        to the rows that share it (same keys and values, a group's prompt prefilled once, not G times)."""
        real = torch.arange(chunk.shape[1], device=self.device)[None, :] < lengths[:, None]
        shared = shared_rows(chunk, real)
        if shared is None:
            return self._append(chunk, lengths)
        first, inverse = shared
        self.mask, self.column_pos, self.positions = self.mask[first], self.column_pos[first], self.positions[first]
        self._append(chunk[first], lengths[first])
        self.mask, self.column_pos, self.positions = (
            self.mask[inverse],
            self.column_pos[inverse],
            self.positions[inverse],
        )
        self.next_logprobs = self.next_logprobs[inverse]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[inverse], layer.values[inverse]

    @torch.inference_mode()
    def score(
        self, tokens: torch.Tensor, n_score: torch.Tensor, n_feed: torch.Tensor, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-probs of a chunk of tokens per row, then append its first ``n_feed`` tokens, in one forward.

        ``n_feed`` is ``n_score`` (the row goes on) or ``n_score - 1`` (its last token ends the
        episode and is never fed), so the forward over the fed tokens yields the log-probs of
        tokens 1..n_score-1; token 0's comes from the previous feed's ``next_logprobs``. ``skip``:
        tokens each row appends unscored before its chunk, in the same forward (a multi-turn env's
        injection since the last call); token 0 of such a row is scored after them.

        Args:
            tokens: (B, S + K) int64: each row's ``skip[i]`` tokens (S = max skip, 0 without), then
                its chunk, right-padded.
            n_score: (B,) int64 chunk tokens of each row to score (0 for rows left as they are).
            n_feed: (B,) int64 chunk tokens of each row to append to the cache.
            skip: (B,) int64, or None: nothing skipped.

        Returns:
            (B, K) float32 log p(chunk[i, j] | row i's history ∘ skipped ∘ chunk[i, :j]), 0 for j >= n_score[i].
        """
        tokens, n_score, n_feed = tokens.to(self.device), n_score.to(self.device), n_feed.to(self.device)
        B = tokens.shape[0]
        skip = torch.zeros_like(n_feed) if skip is None else skip.to(self.device)
        K = tokens.shape[1] - int(skip.max())
        first = self.next_logprobs.gather(1, tokens[:, :1]).squeeze(1)  # token 0 of a row that skips nothing
        total = skip + n_feed
        span = int(total.max())
        out = torch.zeros(B, K, dtype=torch.float32, device=self.device)
        if span:
            targets = torch.cat([tokens[:, 1:], tokens.new_zeros(B, 1)], 1)[:, :span]  # token i+1 after i
            scored = self._append(tokens[:, :span], total, targets)  # [i]: log p(tokens[i + 1] | ..tokens[:i + 1])
            idx = (torch.arange(K, device=self.device)[None, :] + skip[:, None] - 1).clamp(0, span - 1)
            out = scored.gather(1, idx)
            self._compact()
        out[:, 0] = torch.where(skip == 0, first, out[:, 0])
        return torch.where(torch.arange(K, device=self.device)[None, :] < n_score[:, None], out, 0.0)

    def _prefill(self, rows: torch.Tensor, chunk: torch.Tensor, lengths: torch.Tensor) -> None:
        """Start ``rows`` afresh: prefill their prompts alone, then splice into the cache."""
        width = int(lengths[rows].max())
        sub_chunk, sub_len = chunk[rows, :width], lengths[rows]
        offsets = torch.arange(width, device=self.device)
        visible = (offsets[None, :] < sub_len[:, None]).long()
        # The sub-batch sees only its own columns, at positions 0..width-1.
        shared_mask, shared_pos = self.mask, self.column_pos
        self.mask, self.column_pos = visible, offsets.expand(len(rows), -1)
        sub_cache = DynamicCache()
        new = self._forward(sub_chunk, sub_len, sub_cache, torch.zeros_like(sub_len))
        # Splice: ``width`` new columns for every row, visible only to the restarted ones.
        self.mask = shared_mask
        self.mask[rows] = 0
        columns = torch.zeros(self.batch_size, width, dtype=self.mask.dtype, device=self.device)
        columns[rows] = visible
        self.mask = torch.cat([self.mask, columns], dim=1)
        self.column_pos = torch.cat([shared_pos, offsets.expand(self.batch_size, -1)], dim=1)
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
        self.column_pos = torch.gather(self.column_pos, 1, index)
        self.compactions += 1
        for layer in self.cache.layers:
            H, D = layer.keys.shape[1], layer.keys.shape[3]
            kv_index = index[:, None, :, None].expand(-1, H, -1, D)
            layer.keys = torch.gather(layer.keys, 2, kv_index)
            layer.values = torch.gather(layer.values, 2, kv_index)

    @property
    def cache_len(self) -> int:
        return self.mask.shape[1]
