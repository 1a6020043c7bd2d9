"""``SamplingPolicy``: an agent that acts in the envs from a causal LM with its own KV cache.

It reads the env's observation, feeds each row's new token (or, for a row that has just
started an episode, its whole prompt) through ``IncrementalLM`` in one batched forward,
and samples the next token. Its log-prob of that token travels with the action, so the
env never runs the policy again (docs/architecture.md, "Decisions").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlhf_env.errors import SettingError
from rlhf_env.fastgen import as_chunk_action, obs_history, sample_completions, stop_ids_of
from rlhf_env.kvcache import IncrementalLM


def sample_tokens(logprobs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) one token per row drawn from (B, V) log-probs."""
    return torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)


def _fit(env, tokenizer, batch_size, pad_token_id, vocab_size) -> tuple[int, int, int | None]:
    """Rows, pad id and vocabulary from the env (or the tokenizer) where not given explicitly."""
    if env is not None:
        base = getattr(env, "unwrapped", env)
        batch_size = batch_size if batch_size is not None else getattr(base, "num_envs", 1)
        pad_token_id = pad_token_id if pad_token_id is not None else base.pad_token_id
        vocab_size = vocab_size if vocab_size is not None else base.vocab_size
    elif tokenizer is not None:
        from rlhf_env.models import pad_token_id as pad_of

        pad_token_id = pad_token_id if pad_token_id is not None else pad_of(tokenizer)
        vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
    return (1 if batch_size is None else batch_size), (0 if pad_token_id is None else pad_token_id), vocab_size


class SamplingPolicy:
    """Sample ``{"token", "logprob"}`` actions for a batch of ``batch_size`` rows.

    Args:
        model: a Hugging Face causal LM (eval mode; on the device it should run on).
        batch_size: rows of the env (1 for ``TextGenEnv``); default the ``env``'s, else 1.
        env: the env it acts in: its rows, pad id and vocabulary size are taken from it, so a
            model whose embedding is padded beyond the tokenizer samples only ids the env accepts.
        tokenizer: the policy's tokenizer, for the same when there is no env at hand.
        pad_token_id: the id fed in padding slots (``rlhf_env.models.pad_token_id``).
        vocab_size: the tokenizer's size (the env's ``vocab_size``): ids beyond it are never
            sampled and the log-probs are over the first ``vocab_size`` ids, as training
            recomputes them; default all of the model's logits.
        temperature: sampling temperature; the log-prob reported is that of the sampled
            distribution, softmax(logits / temperature), which is the acting policy.
        seed: seed of the sampling generator.
        greedy: take the most likely token (its log-prob reported) instead of sampling.
        cuda_graph: in ``generate`` on CUDA, replay the decode forward as a CUDA graph
            (``rlhf_env.fastgen``); the same samples and log-probs, fewer kernel launches.
        stop_token_ids: the ids that end a completion in ``generate``; default the ``env``'s
            (``stop_token_ids``: EOS, end of turn, ...), else every id of the model's
            ``generation_config.eos_token_id``.

    The built-in ``kv_cache`` generator (``rlhf_env.generation.Generator``): ``act`` for
    the token path, ``generate`` (``rlhf_env.fastgen.sample_completions``) for whole
    completions. Its log-probs are those of a full forward of the policy (exact_logprobs).
    """

    exact_logprobs = True

    def __init__(
        self,
        model,
        batch_size: int | None = None,
        pad_token_id: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        vocab_size: int | None = None,
        greedy: bool = False,
        cuda_graph: bool = False,
        *,
        env=None,
        tokenizer=None,
        stop_token_ids=None,
    ):
        if temperature <= 0:
            raise SettingError(f"temperature must be > 0, got {temperature}")
        batch_size, pad_token_id, vocab_size = _fit(env, tokenizer, batch_size, pad_token_id, vocab_size)
        self.cuda_graph = cuda_graph
        self.lm = IncrementalLM(model, batch_size, pad_token_id, vocab_size)
        self.model, self.pad_token_id, self.vocab_size = model, pad_token_id, vocab_size
        if stop_token_ids is None and env is not None:
            stop_token_ids = getattr(getattr(env, "unwrapped", env), "stop_token_ids", None)
        self.stop_token_ids = stop_ids_of(model, stop_token_ids)
        self.temperature, self.greedy = temperature, greedy
        self.generator = torch.Generator(device=self.lm.device).manual_seed(seed)
        self._fed: torch.Tensor | None = None  # (B,) tokens of each row ``act`` has fed its cache

    def sample(self, logprobs: torch.Tensor) -> torch.Tensor:
        """(B,) tokens drawn from (B, V) log-probs (a data-parallel run swaps in row-seeded draws)."""
        return sample_tokens(logprobs, self.generator)

    def _feed_since(self, obs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(next-token log-probs (B, V), lengths (B,), single)`` after feeding the cache every token of each
        row since the last call: a fresh episode its prompt, a running one its last action, and in a
        multi-turn env what the env injected after it (the cache goes on across turns)."""
        ids = torch.as_tensor(obs["input_ids"])
        single = ids.dim() == 1
        ids = ids.reshape(-1, ids.shape[-1])
        length = torch.as_tensor(obs["length"]).reshape(-1)
        prompt_length = torch.as_tensor(obs["prompt_length"]).reshape(-1)
        B = ids.shape[0]
        if self._fed is None or len(self._fed) != B:
            self._fed = torch.zeros(B, dtype=torch.long)
        restart = (length == prompt_length) | (length <= self._fed)
        lengths = torch.where(restart, length, length - self._fed)
        start = torch.where(restart, 0, self._fed)
        width = max(int(lengths.max()), 1)
        cols = (start[:, None] + torch.arange(width)).clamp(max=ids.shape[1] - 1)
        chunk = torch.where(torch.arange(width) < lengths[:, None], ids.gather(1, cols), self.pad_token_id)
        logprobs = self.lm.feed(chunk, lengths, restart)
        self._fed = length.clone()
        return logprobs, length, single

    def _draw(self, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) tokens and their (B,) log-probs at the sampler's temperature."""
        if self.temperature != 1.0:
            logprobs = torch.log_softmax(logprobs / self.temperature, dim=-1)
        token = logprobs.argmax(-1) if self.greedy else self.sample(logprobs)
        return token, logprobs.gather(1, token[:, None]).squeeze(1)

    def act(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """One action per row from an env observation (batched or single)."""
        logprobs, _, single = self._feed_since(obs)
        token, lp = self._draw(logprobs)
        token, lp = token.cpu().numpy(), lp.cpu().numpy().astype(np.float32)
        if single:
            return {"token": np.int64(token[0]), "logprob": np.float32(lp[0])}
        return {"token": token, "logprob": lp}

    def _generate_turns(self, obs: dict[str, Any], max_tokens: int, turn_end) -> dict[str, np.ndarray]:
        """A multi-turn env's chunk: each row samples until ``turn_end(row, ids)`` (its turn's end) or
        ``max_tokens``, from the cache ``act`` also uses, fed what the env added since the last call. A
        row's last sampled token is fed with the next call, after the env's injection: nothing to undo."""
        logprobs, length, _ = self._feed_since(obs)
        B = len(length)
        tokens = torch.full((B, max_tokens), self.pad_token_id, dtype=torch.long)
        lps = torch.zeros(B, max_tokens, dtype=torch.float32)
        counts = torch.zeros(B, dtype=torch.long)
        active = torch.ones(B, dtype=torch.bool)
        for k in range(max_tokens):
            token, lp = self._draw(logprobs)
            token, lp = token.cpu(), lp.float().cpu()
            tokens[active, k], lps[active, k] = token[active], lp[active]
            counts += active.long()
            for r in active.nonzero().flatten().tolist():
                if turn_end(r, tokens[r, : k + 1].tolist()):
                    active[r] = False
            if k + 1 == max_tokens or not bool(active.any()):
                break
            feed = torch.where(active, token, self.pad_token_id).to(self.lm.device)
            logprobs = self.lm.feed(
                feed[:, None], active.long().to(self.lm.device), torch.zeros_like(active).to(self.lm.device)
            )
        self._fed = length + (counts - 1).clamp(min=0)  # the cache holds all but each row's last token
        width = max(int(counts.max()), 1)  # the env's reference scores the chunk's columns: no empty ones
        return as_chunk_action(tokens[:, :width], lps[:, :width], counts)

    continues_turns = True  # ``generate(..., turn_end=)``: a multi-turn env's turns, the cache going on

    def generate(self, obs: dict[str, Any], max_tokens: int, turn_end=None) -> dict[str, np.ndarray]:
        """Up to ``max_tokens`` tokens per row after each row's history, as a ``step_chunk`` action.

        Independent of ``act``'s cache: every call prefills the rows' histories afresh. With
        ``turn_end`` (a multi-turn env's ``ends_turn``) each row stops where its turn ends, and the
        cache ``act`` uses goes on across calls (``_generate_turns``).
        """
        if turn_end is not None:
            return self._generate_turns(obs, max_tokens, turn_end)
        ids, lengths = obs_history(obs)
        tokens, logprobs, counts = sample_completions(
            self.model,
            ids.reshape(-1, ids.shape[-1]),
            lengths,
            max_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=None,
            stop_token_ids=self.stop_token_ids,
            vocab_size=self.vocab_size,
            generator=self.generator,
            temperature=self.temperature,
            greedy=self.greedy,
            cuda_graph=self.cuda_graph,
        )
        return as_chunk_action(tokens, logprobs, counts)


class GraphedSamplingPolicy(SamplingPolicy):
    """The ``kv_cache_graph`` generator: ``kv_cache`` with ``cuda_graph=True``.

    On CUDA, ``generate`` replays each decode forward of full-attention sdpa models as a CUDA
    graph (``rlhf_env.fastgen``): the same samples and log-probs as ``kv_cache``
    (tests/test_cuda.py), without the per-kernel launch cost that bounds small models. On an
    H200 at batch 256 in bf16, rollouts ran 1.48-1.89x Hugging Face ``generate``'s tokens/s
    where ``kv_cache`` ran 0.75-1.0x (benchmarks/results/gpu/). Elsewhere it is ``kv_cache``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cuda_graph", True)
        super().__init__(*args, **kwargs)
