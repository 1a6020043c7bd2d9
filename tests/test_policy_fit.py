"""``SamplingPolicy`` takes its rows, pad id and vocabulary from the env it acts in (issue 20 §4l)."""

from __future__ import annotations

import numpy as np
import torch
from tinyparts import count_e

from rlhf_env import TextGenEnv, VectorTextGenEnv
from rlhf_env.policy import SamplingPolicy
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model


def padded_pair():
    """A policy whose embedding has 40 ids beyond the tokenizer, their logits made the largest."""
    tok = build_char_tokenizer("abcde ")
    policy, _ = build_tiny_model(tok, seed=1)
    ref, _ = build_tiny_model(tok, seed=0)
    policy.resize_token_embeddings(len(tok) + 40)
    with torch.no_grad():
        policy.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok) + 40))
        policy.lm_head.bias[len(tok) :] = 100.0  # without the vocabulary, only these would be drawn
    return policy.eval(), ref, tok


def test_a_policy_built_with_the_env_samples_only_ids_the_env_accepts():
    policy, ref, tok = padded_pair()
    env = TextGenEnv(tok, ref, count_e, ["abc"], beta=0.1, max_new_tokens=6, device="cpu")
    agent = SamplingPolicy(policy, env=env)
    assert (agent.vocab_size, agent.pad_token_id) == (len(tok), env.pad_token_id)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:  # no InvalidActionError: every token is in [0, len(tok))
        action = agent.act(obs)
        assert action["token"] < len(tok)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated

    venv = VectorTextGenEnv(tok, ref, count_e, ["abc"], num_envs=3, beta=0.1, max_new_tokens=4, device="cpu")
    vagent = SamplingPolicy(policy, env=venv)  # the rows come from the env too
    obs, _ = venv.reset(seed=0)
    action = vagent.generate(obs, 4)
    assert action["token"].shape[0] == 3 and int(np.max(action["token"])) < len(tok)
    venv.step_chunk(action)
    from_tokenizer = SamplingPolicy(policy, 3, tokenizer=tok)
    assert (from_tokenizer.vocab_size, from_tokenizer.pad_token_id) == (len(tok), venv.pad_token_id)
