"""Multi-turn episodes are exact on every architecture of the matrix (tests/tinyarch.py).

A ``MultiTurnVectorEnv`` (groups, autoreset, rows ending at different turns, sliding windows
shorter than the sequences) is driven by ``SamplingPolicy``, whose cache, like the reference's,
goes on across turns: every finished episode is then recomputed with one plain full forward of
each model over its final ids and must agree within ``ATOL`` on the policy tokens: the
reference log-probs, KL terms and rewards, the sampler's log-probs, and the training-time
recomputation from the padded batch (the first ratio is 1). ``RLHF_ENV_EXACTNESS_LOG``: append
each architecture's worst error to this JSON-lines file (``benchmarks/multiturn_exactness.py``).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tinyarch import ARCHITECTURES, WINDOW, build

from rlhf_env import Interaction, MultiTurnVectorEnv, Reply
from rlhf_env.generation import make_sampler
from rlhf_env.models import load_causal_lm, load_tokenizer
from rlhf_env.rollout import EpisodeStream, to_batch
from rlhf_env.scoring import next_token_logprobs
from rlhf_env.turns import INJECTED, POLICY

ATOL = 1e-4
BETA = 0.3
PROMPTS = ["The cat sat", "A dog ran far", "Rain fell", "Tell me"]


class EveryE(Interaction):
    """A turn ends at a text ending in a common letter; the reply is a short, turn-numbered note; EOS ends it."""

    stop_strings = ("e", "a", "t", "o")

    def start(self, prompt):
        return {"n": 0}

    def respond(self, state, turn):
        state["n"] += 1
        if not turn.endswith(self.stop_strings):
            return Reply(done=True)
        return Reply(" note" * state["n"] + ".", reward=0.25)


def length_score(prompts, completions):
    return [0.1 * len(c) for c in completions]


@pytest.mark.parametrize("chunk", [None, 1], ids=["turn_chunks", "token_steps"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_multi_turn_episodes_equal_full_forwards(arch, chunk, arch_checkpoint):
    path = arch_checkpoint(arch, "gpt2")
    ref, tok = load_causal_lm(path, device="cpu"), load_tokenizer(path)
    policy = build(arch, "gpt2", seed=1)
    env = MultiTurnVectorEnv(
        tok,
        ref,
        length_score,
        PROMPTS,
        num_envs=4,
        group_size=2,
        beta=BETA,
        max_new_tokens=24,
        device="cpu",
        interaction=EveryE(),
        max_turns=4,
    )
    sampler = make_sampler("kv_cache", policy, 4, pad_token_id=env.pad_token_id, vocab_size=env.vocab_size, seed=0)
    episodes = []
    for ep in EpisodeStream(env, sampler, 0, chunk=chunk):  # a turn per call, or a token per step
        episodes.append(ep)
        if len(episodes) == 16:
            break
    injections = [int(((ep.source[1:] == POLICY) & (ep.source[:-1] == INJECTED)).sum()) for ep in episodes]
    assert sum(n >= 1 for n in injections) >= 4 and len(set(injections)) >= 2  # several turns, rows end apart
    assert {ep.row for ep in episodes} == {0, 1, 2, 3}  # autoreset: later episodes of every row
    assert max(len(ep.prompt_ids) + len(ep.tokens) for ep in episodes) > WINDOW + 1
    batch = to_batch(episodes, env.pad_token_id, env.vocab_size)
    m = batch.action_mask
    with torch.no_grad():
        full_ref = next_token_logprobs(ref, batch.input_ids, batch.attention_mask, batch.vocab_size)
        full_pol = next_token_logprobs(policy, batch.input_ids, batch.attention_mask, batch.vocab_size)
    # Rewards: −β KL on every policy token, 0.25 per answered turn where it ended, the score last.
    kl_rewards = -BETA * (full_pol - full_ref) * m
    errors = {
        "ref_logprobs": float(((batch.ref_logprobs - full_ref) * m).abs().max()),
        "sampler_logprobs": float(((batch.logprobs - full_pol) * m).abs().max()),
        "kl": float((((batch.logprobs - batch.ref_logprobs) - (full_pol - full_ref)) * m).abs().max()),
        "returns": float(((batch.rewards - kl_rewards).sum(1) - batch.scores).abs().max()),
    }
    final = torch.tensor(length_score(batch.prompts, batch.completions))
    turn_part = batch.scores - final
    assert all(abs(t / 0.25 - round(t / 0.25)) < 1e-4 for t in turn_part.tolist())  # whole turns' rewards
    worst = max(errors.values())
    if os.environ.get("RLHF_ENV_EXACTNESS_LOG"):
        with open(os.environ["RLHF_ENV_EXACTNESS_LOG"], "a") as f:
            f.write(
                json.dumps(
                    {
                        "arch": arch,
                        "path": "token" if chunk else "turn",
                        "episodes": len(episodes),
                        "injections": sum(injections),
                        **errors,
                    }
                )
                + "\n"
            )
    assert worst < ATOL, errors
