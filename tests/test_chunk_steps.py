"""Multi-token steps (``VectorTextGenEnv.step_chunk``) give what K single steps give, per token."""

from __future__ import annotations

import numpy as np
import pytest
from tinyparts import count_e, tiny_pair

from rlhf_env import VectorTextGenEnv
from rlhf_env.errors import InvalidActionError

FIRST = ["A day in the", "Hello there, my"]  # one prompt per group for the first episodes
LATER = ["The cat"]  # the source of later episodes (one prompt: draw order cannot matter)
B, G, N, EPISODES = 4, 2, 7, 3


def make_env(ref, tok):
    env = VectorTextGenEnv(
        tok, ref, count_e, LATER, num_envs=B, group_size=G, beta=0.3, max_new_tokens=N, max_prompt_tokens=16
    )
    env.reset(seed=0, options={"prompts": FIRST})
    return env


def random_agent(tok, seed: int = 0):
    """tokens[row, episode, t] and log-probs, EOS at random places (some episodes run to N)."""
    rng = np.random.default_rng(seed)
    shape = (B, EPISODES + 2, N)
    tokens = rng.integers(3, len(tok), size=shape)
    eos_at = rng.integers(0, N + 3, size=shape[:2])  # >= N: no EOS, the episode is truncated
    for r, e in zip(*np.nonzero(eos_at < N)):
        tokens[r, e, eos_at[r, e]] = tok.eos_token_id
    return tokens, -rng.uniform(0.1, 5.0, size=shape).astype(np.float32)


def record(episodes, row, ep, reward, ref_lp, kl, term, trunc):
    episodes.setdefault((row, ep), []).append((reward, ref_lp, kl, bool(term), bool(trunc)))


def run_single(env, tokens, lps):
    """One token per ``step``; returns {(row, episode): [(r, ref_lp, kl, term, trunc), ...]}, scores, texts."""
    episodes, ends = {}, {}
    ep, t = np.zeros(B, int), np.zeros(B, int)
    resetting = np.zeros(B, bool)
    while ep.min() < EPISODES:
        rows = np.arange(B)
        at = np.minimum(t, N - 1)  # a reset step offers filler
        act = {"token": tokens[rows, ep, at], "logprob": lps[rows, ep, at]}
        _, reward, term, trunc, info = env.step(act)
        for r in np.flatnonzero(~resetting):
            record(episodes, r, ep[r], reward[r], info["ref_logprob"][r], info["kl"][r], term[r], trunc[r])
            t[r] += 1
        for r in np.flatnonzero(resetting):
            ep[r], t[r] = ep[r] + 1, 0
        resetting = term | trunc
        for r in np.flatnonzero(resetting):
            ends[(r, ep[r])] = (info["score"][r], info["completion"][r])
    return episodes, ends


def run_chunked(env, tokens, lps, K: int, seed: int = 1):
    """Up to ``K`` tokens per ``step_chunk`` (a random count per row and call)."""
    rng = np.random.default_rng(seed)
    episodes, ends = {"mid_chunk_ends": 0}, {}
    ep, t = np.zeros(B, int), np.zeros(B, int)
    resetting = np.zeros(B, bool)
    while ep.min() < EPISODES:
        counts = rng.integers(1, K + 1, size=B)
        window = np.minimum(t[:, None] + np.arange(K)[None, :], N - 1)  # past N: filler, never applied
        act = {
            "token": tokens[np.arange(B)[:, None], ep[:, None], window],
            "logprob": lps[np.arange(B)[:, None], ep[:, None], window],
            "length": counts,
        }
        _, reward, term, trunc, info = env.step_chunk(act)
        assert not info["applied"][resetting].any()  # a reset call applies nothing
        for r in np.flatnonzero(~resetting):
            n = int(info["applied"][r].sum())
            assert 1 <= n <= counts[r] and info["applied"][r, :n].all()
            for j in range(n):
                parts = (reward[r, j], info["ref_logprob"][r, j], info["kl"][r, j], term[r, j], trunc[r, j])
                record(episodes, r, ep[r], *parts)
                t[r] += 1
            assert reward[r, n:].sum() == 0 and not (term[r, n:] | trunc[r, n:]).any()
            episodes["mid_chunk_ends"] += int(n < counts[r])
        for r in np.flatnonzero(resetting):
            ep[r], t[r] = ep[r] + 1, 0
        resetting = (term | trunc).any(1)
        for r in np.flatnonzero(resetting):
            ends[(r, ep[r])] = (info["score"][r], info["completion"][r])
    return episodes, ends


@pytest.mark.parametrize("K", [3, N])
def test_chunked_steps_equal_single_steps_per_token(K):
    _, ref, tok = tiny_pair()
    tokens, lps = random_agent(tok)
    single, single_ends = run_single(make_env(ref, tok), tokens, lps)
    chunked, chunked_ends = run_chunked(make_env(ref, tok), tokens, lps, K)
    keys = [(r, e) for r in range(B) for e in range(EPISODES)]
    assert chunked["mid_chunk_ends"] >= 2  # rows ended before their last offered token
    assert any(single[k][-1][3] for k in keys) and any(single[k][-1][4] for k in keys)  # EOS and truncation
    for k in keys:
        a, b = np.array(single[k], dtype=float), np.array(chunked[k], dtype=float)
        assert a.shape == b.shape, k
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
        assert chunked_ends[k][1] == single_ends[k][1]
        assert chunked_ends[k][0] == pytest.approx(single_ends[k][0], abs=1e-6)


def test_tokens_after_an_eos_are_ignored_even_invalid_ones():
    _, ref, tok = tiny_pair()
    env = make_env(ref, tok)
    eos = tok.eos_token_id
    tokens = np.array([[5, eos, 10**6], [5, 6, 7], [eos, -1, -1], [8, 9, 10]])
    _, reward, term, trunc, info = env.step_chunk({"token": tokens, "logprob": np.full((B, 3), -1.0)})
    assert info["applied"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert term.tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]] and not trunc.any()
    assert list(info["_score"]) == [True, False, True, False]
    with pytest.raises(InvalidActionError, match=r"token 1000005 \(env 1, position 1\) is outside the vocabulary"):
        env.step_chunk({"token": np.array([[5, 5]] * 4) + np.array([[0, 0], [0, 10**6], [0, 0], [0, 0]])})
