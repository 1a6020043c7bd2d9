"""Small models and hand computations shared by the env tests."""

from __future__ import annotations

import torch

from rlhf_env.tiny import build_tiny_model


def tiny_pair(policy_seed: int = 1, ref_seed: int = 0, **kw):
    """(policy, reference, tokenizer): two different tiny GPT-2s on one char tokenizer."""
    ref, tok = build_tiny_model(seed=ref_seed, **kw)
    policy, _ = build_tiny_model(tok, seed=policy_seed, **kw)
    return policy, ref, tok


@torch.no_grad()
def next_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(V,) float32 log-probs of the token after ``ids``, from a plain full forward (no cache)."""
    logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def hand_rewards(policy, ref, prompt_ids, completion, beta, score):
    """DESIGN §2 by hand: r_t = -β(log π(y_t|s_t) − log π_ref(y_t|s_t)), + score at t = |y|."""
    out, ids = [], list(prompt_ids)
    for t, y in enumerate(completion):
        kl = next_logprobs(policy, ids)[y] - next_logprobs(ref, ids)[y]
        r = -beta * kl
        if t == len(completion) - 1:
            r = r + score
        out.append(float(r))
        ids.append(y)
    return out


def count_e(prompts, completions):
    """A deterministic text reward for tests: 0.1 per 'e' in the completion, minus 0.05 per char."""
    return [0.1 * c.count("e") - 0.05 * len(c) for c in completions]
