"""Whole-completion sampling for the chunked rollout path (``EpisodeStream`` with ``step_chunk``).

``sample_completions`` is the ``kv_cache`` generator's fast path: one prefill of the rows'
left-aligned histories, then one forward per new token into a preallocated cache
(``WrittenLayer``: written in place, no concatenation; attention sees the written columns
only), with the rows' own positions. The Python work per token is a fixed number of tensor calls,
whatever the batch; decoding stops when every row has sampled a stop id (EOS, end of turn, ...).

On CUDA, ``cuda_graph=True`` replays the decode step's forward as a CUDA graph captured once
per call (full-attention sdpa models; others decode eagerly): a ``StaticLayer`` cache whose
attention spans all columns, the unwritten masked, so that the cache, mask and position
buffers keep fixed shapes and addresses and only the token and its positions are copied in.
At small models a decode step is a few hundred kernel launches of microseconds each, and
the graph removes their CPU cost; the sampling itself stays eager.

``HFGenerateSampler`` is the second registered backend, ``hf_generate``: Hugging Face
``generate`` for any model it supports. Its log-probs come from the logits ``generate``
computed under its own padding and cache, which need not equal a training forward to the
last bit, so it sets ``exact_logprobs = False``: the trainer then recomputes them, reports
``rollout/logprob_diff`` and corrects with truncated importance sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, StaticLayer

from rlhf_env.errors import SettingError
from rlhf_env.kvcache import cache_kwarg, layer_windows, shared_rows
from rlhf_env.prompt_format import generation_stop_ids


def stop_ids_of(model, stop_token_ids: Sequence[int] | None) -> tuple[int, ...]:
    """The ids a sampler stops on: ``stop_token_ids`` (the env's, ``EnvProperties.stop_token_ids``) when
    given, else every id of the model's ``generation_config.eos_token_id`` (an int or a list)."""
    if stop_token_ids is not None:
        return tuple(int(i) for i in stop_token_ids)
    return generation_stop_ids(getattr(model, "generation_config", None))


class WrittenLayer(StaticLayer):
    """A preallocated cache layer that hands attention only the columns written so far.

    Decoding step t then attends over P + t + 1 keys, not all P + K, and each write is a
    slice copy (``StaticLayer`` writes with ``index_copy_``, several times slower on CPU)."""

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len=max_cache_len)
        self.written = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.written = self.written, self.written + key_states.shape[-2]
        self.cumulative_length.add_(key_states.shape[-2])
        self.keys[:, :, start : self.written] = key_states
        self.values[:, :, start : self.written] = value_states
        return self.keys[:, :, : self.written], self.values[:, :, : self.written]


def _left_aligned(ids: torch.Tensor, lengths: torch.Tensor, pad_token_id: int):
    """(B, P) histories moved to the right end (P = longest), their (B, P) positions and visibility."""
    P = int(lengths.max())
    src = torch.arange(P, device=ids.device)[None, :] - (P - lengths)[:, None]  # index into the row
    visible = src >= 0
    left = torch.where(visible, ids.gather(1, src.clamp(min=0, max=ids.shape[1] - 1)), pad_token_id)
    return left, src.clamp(min=0), visible


def attention_masks(
    windows: dict,
    visible: torch.Tensor,
    col_pos: torch.Tensor,
    q_pos: torch.Tensor,
    kernel: str,
    dtype,
    related: torch.Tensor | None = None,
):
    """Attention masks (B, 1, q, M) for queries at positions ``q_pos`` (B, q) over all M cache columns.

    A key is allowed when written and visible, not after the query by position, within the
    layer's window and, where ``related`` (B, q, M) bool is given, where it is True (rows
    holding several branches: ``scoring.branch_logprobs``); one mask or ``{layer type: mask}``
    (models mixing layer types)."""
    gap = q_pos[:, :, None] - col_pos[:, None, :]
    seen = visible[:, None, :] & (gap >= 0)
    if related is not None:
        seen = seen & related
    out = {}
    for kind, window in windows.items():
        allowed = (seen & (gap < window) if window else seen)[:, None]
        if kernel != "sdpa":  # eager takes an additive mask
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        out[kind] = allowed
    return out if len(out) > 1 else next(iter(out.values()))


def _graphed_decode(model, forward: dict, cache, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor):
    """A CUDA graph of one decode forward: ``step(tok (B,), q_pos (B, 1)) -> logits (B, 1, V)``.

    ``mask`` must be a view of a buffer the caller updates in place. Warm-up runs (needed before
    capture) write one throwaway column where the next real step writes anyway, and the cache
    lengths they advance are restored, so the cache is left as it was.
    """
    tok_in, pos_in = tok[:, None].clone(), pos.clone()
    lengths = [layer.cumulative_length.clone() for layer in cache.layers]

    def run():
        return model(input_ids=tok_in, attention_mask=mask, position_ids=pos_in, **forward).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    for layer, n in zip(cache.layers, lengths):
        layer.cumulative_length.copy_(n)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = run()

    def step(t: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        tok_in.copy_(t[:, None])
        pos_in.copy_(q_pos)
        graph.replay()
        return logits

    return step


def _prefill(model, left, mask, pos, visible, forward: dict, shared: bool) -> torch.Tensor:
    """(B, 1, V) logits after each row's history, filling ``forward``'s cache; with ``shared``, rows that
    hold the same history (a group's copies of one prompt) are forwarded once and their cache rows copied."""
    rows = shared_rows(left, visible) if shared else None
    if rows is None:
        return model(input_ids=left, attention_mask=mask, position_ids=pos, logits_to_keep=1, **forward).logits
    first, inverse = rows
    sub = {k: m[first] for k, m in mask.items()} if isinstance(mask, dict) else mask[first]
    logits = model(
        input_ids=left[first], attention_mask=sub, position_ids=pos[first], logits_to_keep=1, **forward
    ).logits
    for layer in forward[cache_kwarg(model)].layers:  # (U, H, M, D) buffers -> (B, H, M, D)
        layer.keys, layer.values = layer.keys[inverse], layer.values[inverse]
        layer.batch_size = len(inverse)
    return logits[inverse]


@torch.inference_mode()
def sample_completions(
    model,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    max_tokens: int,
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    vocab_size: int | None,
    generator: torch.Generator,
    temperature: float = 1.0,
    greedy: bool = False,
    cuda_graph: bool = False,
    stop_token_ids: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``max_tokens`` tokens after each row's ``ids[i, :lengths[i]]``.

    Returns ``(tokens (B, K), logprobs (B, K), counts (B,))`` on ``ids``' device, K <= max_tokens:
    the log-probs are those of softmax(logits / temperature) over the first ``vocab_size``
    ids, the distribution each token was drawn from; ``counts`` is up to and including the
    first stop id: ``eos_token_id`` or one of ``stop_token_ids`` (the env ignores what follows). ``cuda_graph``: replay the decode forward as a
    CUDA graph (CUDA, full-attention sdpa only; ignored elsewhere). Same tokens and log-probs.
    """
    device = next(model.parameters()).device
    ids, lengths = ids.to(device), lengths.to(device)
    B, K = ids.shape[0], int(max_tokens)
    left, pos, visible = _left_aligned(ids, lengths, pad_token_id)
    P, M = left.shape[1], left.shape[1] + K
    col_pos = torch.cat([pos, lengths[:, None] + torch.arange(K, device=device)[None, :]], dim=1)  # (B, M)
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None:
        # A row may be asked for more tokens than fit (the env ignores those past its room):
        # they sit at the last position rather than index past the position table.
        col_pos = col_pos.clamp(max=limit - 1)
    vis = torch.cat([visible, torch.zeros(B, K, dtype=torch.bool, device=device)], dim=1)
    windows, kernel = layer_windows(model), model.config._attn_implementation
    full_sdpa = kernel == "sdpa" and not any(windows.values())
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    use_graph = cuda_graph and full_sdpa and device.type == "cuda" and K > 1
    if use_graph:  # a graph needs fixed shapes: attention over all M columns, the unwritten masked
        cache = Cache(layers=[StaticLayer(max_cache_len=M) for _ in range(n_layers)])
        mask = attention_masks(windows, vis, col_pos, pos, kernel, model.dtype)
    else:  # queries see only the columns written so far (the cache hands attention no others)
        cache = Cache(layers=[WrittenLayer(max_cache_len=M) for _ in range(n_layers)])
        mask = attention_masks(windows, vis[:, :P], col_pos[:, :P], pos, kernel, model.dtype)
    forward = dict(use_cache=True, **{cache_kwarg(model): cache})
    logits = _prefill(model, left, mask, pos, visible, forward, shared=not use_graph)
    tokens = torch.full((B, K), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, K, dtype=torch.float32, device=device)
    counts = torch.full((B,), K, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = [i for i in (eos_token_id, *stop_token_ids) if i is not None]
    stop = torch.tensor(sorted(set(stops)), dtype=torch.long, device=device)  # (S,)
    graphed = None
    for t in range(K):
        lp = torch.log_softmax(logits[:, -1, :vocab_size].float() / temperature, dim=-1)
        tok = lp.argmax(-1) if greedy else torch.multinomial(lp.exp(), 1, generator=generator).squeeze(1)
        tokens[:, t], logprobs[:, t] = tok, lp.gather(1, tok[:, None]).squeeze(1)
        if len(stop):  # eager, outside any CUDA graph: the graph replays the forward only
            ends = ~done & torch.isin(tok, stop)
            counts = torch.where(ends, t + 1, counts)
            done |= ends
            if bool(done.all()):  # every later token would be ignored
                return tokens[:, : t + 1], logprobs[:, : t + 1], counts
        if t == K - 1:
            break
        vis[:, P + t] = True
        n = P + t + 1  # columns written once this token is
        q_pos, seen = col_pos[:, P + t : n], vis[:, :n]
        # Full attention: every written column precedes the query, so visibility is the mask.
        if use_graph:
            graphed = graphed or _graphed_decode(model, forward, cache, tok, q_pos, vis[:, None, None, :])
            logits = graphed(tok, q_pos)
            continue
        mask = (
            seen[:, None, None, :]
            if full_sdpa
            else attention_masks(windows, seen, col_pos[:, :n], q_pos, kernel, model.dtype)
        )
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=q_pos, **forward).logits
    return tokens, logprobs, counts


def obs_history(obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and (B,) lengths of a vector-env observation."""
    return torch.as_tensor(np.asarray(obs["input_ids"])), torch.as_tensor(np.asarray(obs["length"])).reshape(-1)


def as_chunk_action(tokens: torch.Tensor, logprobs: torch.Tensor, counts: torch.Tensor) -> dict[str, np.ndarray]:
    return {
        "token": tokens.cpu().numpy(),
        "logprob": logprobs.cpu().numpy().astype(np.float32),
        "length": counts.clamp(min=1).cpu().numpy(),
    }


class HFGenerateSampler:
    """The ``hf_generate`` generator: Hugging Face ``generate`` (sampling from the full softmax).

    ``generate(obs, max_tokens)`` samples whole completions for the chunked rollout path, each
    until its first of ``stop_token_ids`` (the env's; default every id of the model's
    ``generation_config.eos_token_id``);
    ``act`` (the token path, e.g. through Gymnasium wrappers) calls it for one token at a
    time, which is correct but re-encodes every history: slow, a fallback only.
    """

    exact_logprobs = False  # generate's padding and cache are not the training forward's

    def __init__(
        self,
        model,
        batch_size: int,
        *,
        pad_token_id: int,
        vocab_size: int,
        seed: int,
        temperature: float = 1.0,
        greedy: bool = False,
        stop_token_ids: Sequence[int] | None = None,
    ):
        if temperature <= 0:
            raise SettingError(f"temperature must be > 0, got {temperature}")
        self.model, self.batch_size, self.pad_token_id, self.vocab_size = model, batch_size, pad_token_id, vocab_size
        self.temperature, self.greedy, self.seed = temperature, greedy, seed
        self.calls = 0
        self.stop_token_ids = stop_ids_of(model, stop_token_ids)  # the env's, else the generation config's

    @torch.inference_mode()
    def generate(self, obs: dict[str, Any], max_tokens: int) -> dict[str, np.ndarray]:
        ids, lengths = obs_history(obs)
        device = next(self.model.parameters()).device
        left, pos, visible = _left_aligned(ids.to(device), lengths.to(device), self.pad_token_id)
        config = copy.deepcopy(self.model.generation_config)
        config.update(
            do_sample=not self.greedy,
            top_k=0,
            top_p=1.0,
            temperature=self.temperature,
            max_new_tokens=max_tokens,
            min_new_tokens=0,
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.stop_token_ids) or None,
            return_dict_in_generate=True,
            output_logits=True,
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + self.calls)  # generate draws from the global RNG
            self.calls += 1
            out = self.model.generate(
                input_ids=left,
                attention_mask=visible.long(),
                generation_config=config,
            )
        tokens = out.sequences[:, left.shape[1] :]
        logits = torch.stack(out.logits, dim=1)[..., : self.vocab_size].float() / self.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(2, tokens[..., None]).squeeze(2)
        counts = torch.full((len(tokens),), tokens.shape[1], dtype=torch.long, device=tokens.device)
        if self.stop_token_ids:
            is_eos = torch.isin(tokens, torch.tensor(self.stop_token_ids, device=tokens.device))
            counts = torch.where(is_eos.any(1), is_eos.to(torch.int8).argmax(1) + 1, counts)
        return as_chunk_action(tokens, logprobs, counts)

    def act(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        chunk = self.generate(obs, 1)
        return {"token": chunk["token"][:, 0], "logprob": chunk["logprob"][:, 0]}
