"""The one rollout path: run a sampler in a vector env, episode by episode.

``EpisodeStream`` steps a ``VectorTextGenEnv`` (or any wrapper of it) with a sampler from
the generation seam (``rlhf_env.generation``) and yields every episode as it ends;
``collect`` keeps the first episode of each row as a typed ``RolloutBatch`` (training),
``evaluate`` averages the gold reward and KL of such a batch (evaluation; "base-model gold"
is ``evaluate`` of the base model: sampled at temperature 1 on the first ``EVAL_PROMPTS``
eval prompts with ``EVAL_SEED``). Only the envs' public API is used, through wrappers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf_env.generation import DEFAULT_GENERATOR, make_sampler
from rlhf_env.scoring import pad_batch
from rlhf_env.seeding import derive
from rlhf_env.turns import INJECTED, POLICY

EVAL_PROMPTS = 64  # the first n eval prompts
EVAL_SEED = 12345  # one fixed seed for every evaluation


def env_attr(env, name: str) -> Any:
    """``name`` of the innermost env that has it, through Gymnasium (vector) wrappers."""
    while not hasattr(env, name) and hasattr(env, "env"):
        env = env.env
    return getattr(env, name)


def set_env_attr(env, name: str, value: Any) -> None:
    """Set ``name`` (e.g. ``beta``) on the env that has it, through wrappers."""
    while not hasattr(env, name) and hasattr(env, "env"):
        env = env.env
    setattr(env, name, value)


@dataclass
class Episode:
    """One finished episode of one env row; the per-token arrays are (n,) for n completion tokens."""

    row: int
    prompt: str
    completion: str
    prompt_ids: list[int]
    tokens: np.ndarray  # int64, the completion ids
    logprobs: np.ndarray  # float32, log π_old of each token (the sampler's)
    ref_logprobs: np.ndarray  # float32, log π_ref (0 without a reference)
    rewards: np.ndarray  # float32, the env's token rewards
    score: float  # the reward at the end
    kl: float  # Σ_t (log π_θ − log π_ref), as the env reported it
    ret: float  # Σ_t rewards
    # Multi-turn (``MultiTurnVectorEnv``): per completion token, turns.POLICY (sampled; the arrays
    # above hold its log-probs and rewards) or turns.INJECTED (appended by the env: 0 there). None:
    # every token is the policy's.
    source: np.ndarray | None = None
    turns: int = 1  # policy turns


class EpisodeStream:
    """Iterate the episodes of ``env`` (``NEXT_STEP`` autoreset) acted on by ``sampler``.

    ``env.reset(seed, options)`` happens on the first iteration; ``tokens`` counts the
    tokens applied so far. ``chunk``: tokens per env call. The default (None) is the whole
    completion where the env has ``step_chunk`` (a bare ``VectorTextGenEnv``) and the
    sampler has ``generate``: a rollout is then one policy generation and one reference
    pass; a multi-turn env's is one turn per call, with a sampler that ``continues_turns``.
    Otherwise, and with ``chunk=1``, one ``step`` per token (Gymnasium wrappers see every step).
    """

    def __init__(self, env, sampler, seed: int | None = None, options: dict | None = None, chunk: int | None = None):
        self.env, self.sampler, self.seed, self.options = env, sampler, seed, options
        self.tokens = 0
        can_chunk = callable(getattr(env, "step_chunk", None)) and hasattr(sampler, "generate")
        # A multi-turn env chunks by turns, with a sampler whose cache goes on across them.
        self.turn_end = getattr(env, "ends_turn", None)
        if self.turn_end is not None and not getattr(sampler, "continues_turns", False):
            can_chunk = False
        self.chunk = (chunk or env_attr(env, "max_new_tokens")) if can_chunk and chunk != 1 else None

    def _step(self, obs, acting: np.ndarray):
        """One env call as (B, K) arrays: tokens, log-probs, rewards, terminated, truncated, applied, info."""
        B = len(acting)
        if self.chunk is None:
            action = self.sampler.act(obs)
            obs, reward, terminated, truncated, info = self.env.step(action)
            info = {k: (v[:, None] if k in ("ref_logprob", "kl") else v) for k, v in info.items()}
            cols = (action["token"], action["logprob"], reward, terminated, truncated, acting)
            return obs, *(np.asarray(c)[:, None] for c in cols), info
        if acting.any():
            done = (obs["length"] - obs["prompt_length"])[acting].min()
            # Rows on their reset step generate from their prompt: ignored, but kept short.
            obs = {**obs, "length": np.where(acting, obs["length"], obs["prompt_length"])}
            n = int(min(self.chunk, env_attr(self.env, "max_new_tokens") - done))
            if self.turn_end is not None:  # a multi-turn env: each row samples to its turn's end
                action = self.sampler.generate(obs, n, turn_end=self.turn_end)
            else:
                action = self.sampler.generate(obs, n)
        else:  # every row is resetting: nothing to generate
            action = {"token": np.zeros((B, 1), np.int64), "logprob": np.zeros((B, 1), np.float32)}
        obs, reward, terminated, truncated, info = self.env.step_chunk(action)
        tokens, logprob = np.asarray(action["token"]), np.asarray(action["logprob"])
        return obs, tokens, logprob, reward, terminated, truncated, info["applied"], info

    def __iter__(self) -> Iterator[Episode]:
        env = self.env
        B, N = env.num_envs, env_attr(env, "max_new_tokens")
        obs, _ = env.reset(seed=self.seed, options=self.options)
        prompt_ids = [obs["input_ids"][r, : obs["prompt_length"][r]].tolist() for r in range(B)]
        tokens = np.zeros((B, N), dtype=np.int64)
        logp, ref_logp, rewards = (np.zeros((B, N), dtype=np.float32) for _ in range(3))
        kl, ret = np.zeros(B, dtype=np.float64), np.zeros(B, dtype=np.float64)
        source = np.ones((B, N), dtype=np.int8)  # turns.POLICY, turns.INJECTED where the env appended
        length = np.zeros(B, dtype=np.int64)
        acting = np.ones(B, dtype=bool)  # False on a row's reset step (the step after it ended)
        while True:
            obs, toks, lps, reward, terminated, truncated, applied, info = self._step(obs, acting)
            self.tokens += int(applied.sum())
            for r in np.flatnonzero(acting):
                n, t = int(applied[r].sum()), int(length[r])
                tokens[r, t : t + n], logp[r, t : t + n] = toks[r, :n], lps[r, :n]
                if "ref_logprob" in info:
                    ref_logp[r, t : t + n] = info["ref_logprob"][r, :n]
                rewards[r, t : t + n] = reward[r, :n]
                ret[r] += float(reward[r, :n].astype(np.float64).sum())
                if "kl" in info:
                    kl[r] += float(info["kl"][r, :n].astype(np.float64).sum())
                length[r] += n
                if "_injected" in info and info["_injected"][r]:  # the env's tokens after the turn
                    ids, t = info["injected"][r], int(length[r])
                    tokens[r, t : t + len(ids)], source[r, t : t + len(ids)] = ids, INJECTED
                    logp[r, t : t + len(ids)] = ref_logp[r, t : t + len(ids)] = rewards[r, t : t + len(ids)] = 0.0
                    length[r] += len(ids)
            for r in np.flatnonzero(~acting):  # a reset step: the row's next episode begins
                prompt_ids[r] = obs["input_ids"][r, : obs["prompt_length"][r]].tolist()
            ended = (np.asarray(terminated) | np.asarray(truncated)).any(1)
            done = []
            for r in np.flatnonzero(ended):
                n = int(length[r])
                done.append(
                    Episode(
                        int(r),
                        str(info["prompt"][r]),
                        str(info["completion"][r]),
                        prompt_ids[r],
                        tokens[r, :n].copy(),
                        logp[r, :n].copy(),
                        ref_logp[r, :n].copy(),
                        rewards[r, :n].copy(),
                        float(info["score"][r]),
                        float(kl[r]),
                        float(ret[r]),
                        source[r, :n].copy() if "_turns" in info else None,  # a multi-turn env's
                        int(info["turns"][r]) if "_turns" in info else 1,
                    )
                )
                length[r], kl[r], ret[r] = 0, 0.0, 0.0
                source[r] = POLICY
            acting = ~ended
            yield from done


@dataclass
class RolloutBatch:
    """One completed episode per env row, in "action" coordinates.

    Position ``t`` of the (B, L-1) tensors is the choice of token ``input_ids[:, t+1]``,
    matching ``next_token_logprobs``; ``action_mask`` is 1 on the tokens the policy sampled: the
    completion, less a multi-turn episode's injected spans (holes every trainer's masks skip).
    """

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor  # (B, L) prompt ∘ completion, right-padded
    attention_mask: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, L-1) float
    logprobs: torch.Tensor  # (B, L-1) log π_old of the taken tokens
    ref_logprobs: torch.Tensor  # (B, L-1) log π_ref
    rewards: torch.Tensor  # (B, L-1) the env's token rewards (KL-shaped, score at the end)
    scores: torch.Tensor  # (B,) the reward at the end of each episode (gold here)
    vocab_size: int | None = None  # the tokenizer's ids: log-probs are over these (see ``token_logprobs``)
    # Set by a trainer whose generator's log-probs are not exact (``generation.exact_logprobs``):
    is_weights: torch.Tensor | None = None  # (B, L-1) truncated importance weights π_θold / π_sampler
    logprob_diff: float | None = None  # mean |log π_sampler − log π_θold| over completion tokens
    turns: torch.Tensor | None = None  # (B,) policy turns of each episode (multi-turn envs), else None

    @property
    def num_tokens(self) -> int:
        return int(self.action_mask.sum())


def first_episodes(stream: EpisodeStream, num_rows: int) -> list[Episode]:
    """Step ``stream`` until every row finished one episode; its first episode of each row, in row order."""
    first: list[Episode | None] = [None] * num_rows
    left = num_rows
    for ep in stream:
        if first[ep.row] is None:
            first[ep.row], left = ep, left - 1
            if not left:
                break
    return first  # type: ignore[return-value]


def to_batch(episodes: list[Episode], pad_token_id: int, vocab_size: int | None, device=None) -> RolloutBatch:
    """Pack one episode per row into a ``RolloutBatch`` (on ``device``)."""
    seqs = [ep.prompt_ids + ep.tokens.tolist() for ep in episodes]
    ids, attn = pad_batch(seqs, pad_token_id)
    shape = (len(episodes), ids.shape[1] - 1)
    action_mask, old, ref, rew = (torch.zeros(shape) for _ in range(4))
    for r, ep in enumerate(episodes):
        start, n = len(ep.prompt_ids) - 1, len(ep.tokens)
        # policy tokens only: a multi-turn episode's injected spans are holes in the mask
        action_mask[r, start : start + n] = 1 if ep.source is None else torch.from_numpy(ep.source == POLICY).float()
        old[r, start : start + n] = torch.from_numpy(ep.logprobs)
        ref[r, start : start + n] = torch.from_numpy(ep.ref_logprobs)
        rew[r, start : start + n] = torch.from_numpy(ep.rewards)
    scores = torch.tensor([ep.score for ep in episodes], dtype=torch.float32)
    tensors = [t.to(device) for t in (ids, attn, action_mask, old, ref, rew, scores)]
    batch = RolloutBatch([ep.prompt for ep in episodes], [ep.completion for ep in episodes], *tensors, vocab_size)
    if any(ep.source is not None for ep in episodes):
        batch.turns = torch.tensor([float(ep.turns) for ep in episodes], device=device)
    return batch


def stop_ids(env) -> tuple[int, ...] | None:
    """The env's ``stop_token_ids`` through wrappers (None for an env without them)."""
    try:
        return tuple(env_attr(env, "stop_token_ids"))
    except AttributeError:
        return None


def collect(
    env,
    model,
    seed: int,
    prompts: list[str] | None = None,
    *,
    device=None,
    generator: str = DEFAULT_GENERATOR,
    greedy: bool = False,
) -> RolloutBatch:
    """Run ``model`` (through the registered ``generator``) until every row of ``env`` finished one episode.

    ``prompts`` (one per group) fixes the prompts, as evaluation does; else they are drawn. The env's
    prompt draw and the sampler get independent streams of ``seed`` (``rlhf_env.seeding``).
    """
    B, pad, vocab = env.num_envs, env_attr(env, "pad_token_id"), env_attr(env, "vocab_size")
    stops = stop_ids(env)  # the sampler stops where the env ends an episode
    sampler = make_sampler(
        generator,
        model,
        B,
        pad_token_id=pad,
        vocab_size=vocab,
        seed=derive(seed, "sampler"),
        greedy=greedy,
        stop_token_ids=stops,
    )
    stream = EpisodeStream(env, sampler, derive(seed, "prompts"), {"prompts": prompts} if prompts is not None else None)
    return to_batch(first_episodes(stream, B), pad, vocab, device)


def sequence_kl(batch: RolloutBatch) -> torch.Tensor:
    """(B,) Σ_t (log π − log π_ref) over each completion: the sampled KL to the reference (docs/maths.md §3)."""
    with torch.no_grad():
        return ((batch.logprobs - batch.ref_logprobs) * batch.action_mask).sum(1)


def evaluate(
    env,
    model,
    prompts: list[str],
    *,
    seed: int = EVAL_SEED,
    device=None,
    greedy: bool = False,
    generator: str = DEFAULT_GENERATOR,
) -> dict[str, Any]:
    """Gold reward and KL of ``model``'s completions of ``prompts`` (one row of ``env`` each).

    ``env``: a vector env with ``len(prompts)`` rows, the gold reward, β = 0 and the
    reference model. Returns ``gold_mean``, ``kl_mean`` (Σ_t log π − log π_ref), ``n``
    and the first three ``examples`` (prompt, completion).
    """
    batch = collect(env, model, seed, list(prompts), device=device, generator=generator, greedy=greedy)
    return {
        "gold_mean": float(batch.scores.mean()),
        "kl_mean": float(sequence_kl(batch).mean()),
        "n": len(batch.prompts),
        "examples": list(zip(batch.prompts[:3], batch.completions[:3])),
    }


def complete(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    seed: int = 0,
    greedy: bool = False,
    generator: str = DEFAULT_GENERATOR,
    chat_template: str = "auto",
) -> list[str]:
    """``model``'s completions of ``prompts`` (sampled at temperature 1, or greedy), in their order.

    The rollout path in an env without reference or reward (β = 0), one row per prompt; prompts
    go through the chat template as ``chat_template`` says, and every id of the model's
    ``generation_config.eos_token_id`` ends a completion, as in an env with it as reference.
    """
    from rlhf_env.prompt_format import generation_stop_ids
    from rlhf_env.vector_env import VectorTextGenEnv

    device = next(model.parameters()).device
    env = VectorTextGenEnv(
        tokenizer,
        None,
        lambda p, c: [0.0] * len(c),
        prompts,
        num_envs=len(prompts),
        beta=0.0,
        max_new_tokens=max_new_tokens,
        device=device,
        chat_template=chat_template,
        stop_token_ids=generation_stop_ids(getattr(model, "generation_config", None)),
    )
    return collect(env, model, seed, list(prompts), generator=generator, greedy=greedy).completions
