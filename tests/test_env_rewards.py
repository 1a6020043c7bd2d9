"""The env's token rewards equal docs/maths.md §2 computed by hand from plain forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinyparts import count_e, hand_rewards, next_logprobs, tiny_pair

from rlhf_env import TextGenEnv, VectorTextGenEnv

BETA = 0.3
PROMPTS = ["The cat", "A day in the", "Hello there, my"]


def sample_completion(policy, ids, n, gen, eos=None, eos_at=None):
    """Sample ``n`` tokens from full forwards of ``policy`` (forcing EOS at step ``eos_at``)."""
    ids, toks, lps = list(ids), [], []
    for t in range(n):
        lp = next_logprobs(policy, ids)
        y = eos if t == eos_at else int(torch.multinomial(lp.exp(), 1, generator=gen))
        toks.append(y)
        lps.append(float(lp[y]))
        ids.append(y)
        if t == eos_at:
            break
    return toks, lps


@pytest.mark.parametrize("eos_at", [None, 3])
def test_single_env_rewards_match_hand_computation(eos_at):
    policy, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, PROMPTS, beta=BETA, max_new_tokens=6, device="cpu")
    obs, _ = env.reset(seed=0, options={"prompt": "A day in the"})
    prompt_ids = obs["input_ids"][: obs["prompt_length"]].tolist()
    gen = torch.Generator().manual_seed(0)
    toks, lps = sample_completion(policy, prompt_ids, 6, gen, tok.eos_token_id, eos_at)

    rewards, infos = [], []
    for y, lp in zip(toks, lps):
        obs, r, terminated, truncated, info = env.step({"token": y, "logprob": lp})
        rewards.append(r)
        infos.append(info)
    assert terminated == (eos_at is not None) and truncated == (eos_at is None)

    completion = tok.decode(toks, skip_special_tokens=True)
    score = count_e(["A day in the"], [completion])[0]
    assert infos[-1]["score"] == pytest.approx(score, abs=1e-6)
    assert infos[-1]["completion"] == completion
    expected = hand_rewards(policy, ref, prompt_ids, toks, BETA, score)
    np.testing.assert_allclose(rewards, expected, atol=1e-5, rtol=0)
    # the parts travel separately in info
    ids = list(prompt_ids)
    for y, lp, info in zip(toks, lps, infos):
        ref_lp = float(next_logprobs(ref, ids)[y])
        assert info["ref_logprob"] == pytest.approx(ref_lp, abs=1e-5)
        assert info["kl"] == pytest.approx(lp - ref_lp, abs=1e-5)
        ids.append(y)


def test_vector_env_rewards_match_hand_computation_across_autoresets():
    policy, ref, tok = tiny_pair()
    B, N = 3, 5
    env = VectorTextGenEnv(tok, ref, count_e, PROMPTS, num_envs=B, beta=BETA, max_new_tokens=N, device="cpu")
    obs, _ = env.reset(seed=0, options={"prompts": PROMPTS})
    gen = torch.Generator().manual_seed(1)
    eos_at = {0: 1, 1: None, 2: 3}  # rows end at different steps, then autoreset
    seqs = {r: obs["input_ids"][r, : obs["prompt_length"][r]].tolist() for r in range(B)}
    episodes = {r: {"prompt": seqs[r], "toks": [], "rewards": []} for r in range(B)}
    finished = []  # (prompt ids, tokens, env rewards, env score)
    step_of = dict.fromkeys(range(B), 0)
    ended = np.zeros(B, dtype=bool)
    for _ in range(12):
        tokens, lps, resetting = np.zeros(B, np.int64), np.zeros(B, np.float32), []
        for r in range(B):
            if ended[r]:  # NEXT_STEP autoreset: this row's action is ignored
                resetting.append(r)
                tokens[r] = 10**6  # even an invalid token
                continue
            ep = episodes[r]
            ids = ep["prompt"] + ep["toks"]
            lp = next_logprobs(policy, ids)
            y = tok.eos_token_id if step_of[r] == eos_at[r] else int(torch.multinomial(lp.exp(), 1, generator=gen))
            tokens[r], lps[r] = y, lp[y]
        obs, rew, term, trunc, info = env.step({"token": tokens, "logprob": lps})
        ended = term | trunc
        for r in range(B):
            ep = episodes[r]
            if r in resetting:  # the step after an end: reward 0, a fresh prompt
                assert rew[r] == 0 and not term[r] and not trunc[r]
                assert obs["length"][r] == obs["prompt_length"][r]
                episodes[r] = {
                    "prompt": obs["input_ids"][r, : obs["prompt_length"][r]].tolist(),
                    "toks": [],
                    "rewards": [],
                }
                step_of[r] = 0
                eos_at[r] = None
                continue
            ep["toks"].append(int(tokens[r]))
            ep["rewards"].append(float(rew[r]))
            step_of[r] += 1
            if term[r] or trunc[r]:
                assert info["_score"][r]
                finished.append((ep["prompt"], ep["toks"], ep["rewards"], float(info["score"][r])))
    assert len(finished) >= 4
    for prompt_ids, toks, rewards, score in finished:
        prompt = tok.decode(prompt_ids)
        completion = tok.decode(toks, skip_special_tokens=True)
        assert score == pytest.approx(count_e([prompt], [completion])[0], abs=1e-6)
        expected = hand_rewards(policy, ref, prompt_ids, toks, BETA, score)
        np.testing.assert_allclose(rewards, expected, atol=1e-5, rtol=0)
