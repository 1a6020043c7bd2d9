"""Small models and hand computations shared by the env tests."""

from __future__ import annotations

import torch

from rlhf_env.tiny import build_tiny_model


def tiny_pair(policy_seed: int = 1, ref_seed: int = 0, **kw):
    """(policy, reference, tokenizer): two different tiny GPT-2s on one char tokenizer."""
    ref, tok = build_tiny_model(seed=ref_seed, **kw)
    policy, _ = build_tiny_model(tok, seed=policy_seed, **kw)
    return policy, ref, tok


def nudged_pair(chars: str, scale: float = 0.05):
    """(tokenizer, reference, policy) on a char tokenizer of ``chars``: the policy is the reference with
    seeded noise added, apart from it but close (multi-turn tests: both see long sequences)."""
    import copy

    from rlhf_env.tiny import build_char_tokenizer

    tok = build_char_tokenizer(chars)
    ref, _ = build_tiny_model(tok, seed=1, n_positions=128)
    policy = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(0)
    for p in policy.parameters():
        p.data.add_(scale * torch.randn(p.shape, generator=gen))
    return tok, ref, policy


@torch.no_grad()
def next_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(V,) float32 log-probs of the token after ``ids``, from a plain full forward (no cache)."""
    logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def hand_rewards(policy, ref, prompt_ids, completion, beta, score):
    """docs/maths.md §2 by hand: r_t = -β(log π(y_t|s_t) − log π_ref(y_t|s_t)), + score at t = |y|."""
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


# A third-party algorithm (SFT steps on the task's data) with switches to fail in the ways a
# real one can; registered as toy_sft, toy and toy_crash.
TOY_ALGO_SOURCE = '''
import os
from dataclasses import dataclass

import torch

from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env import hookimpl
from rlhf_env.scoring import sft_loss


@dataclass
class Config:
    lr: float = 1e-2
    fail_at: int = -1  # raise at this step
    die_at: int = -1  # kill the process at this step


class Trainer:
    """A third-party algorithm: SFT steps on the task's data, with ways to fail."""

    def __init__(self, ctx, config):
        self.ctx, self.config = ctx, config
        self.opt = torch.optim.SGD(ctx.policy.parameters(), lr=config.lr)

    def step(self, step, seed):
        if step == self.config.fail_at:
            raise RuntimeError("toy failure on purpose")
        if step == self.config.die_at:
            os._exit(3)
        loss = sft_loss(self.ctx.policy, self.ctx.tokenizer, self.ctx.task.sft_data[:8])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss/policy": loss.item(), "perf/tokens": 20}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@hookimpl
def rlhf_register_algorithms(register):
    register("toy_sft", AlgorithmSpec(Config, Trainer))
    register("toy", AlgorithmSpec(Config, Trainer))
    register("toy_crash", AlgorithmSpec(Config, Trainer))
'''


def assert_batch_exact(batch, ref, policy, atol: float = 1e-4):
    """The batch's reference and sampler log-probs on its policy tokens equal one plain full forward
    of each model over its final ids; returns those (full_ref, full_policy) (B, L-1) log-probs."""
    from rlhf_env.scoring import next_token_logprobs

    m = batch.action_mask
    with torch.no_grad():
        full_ref = next_token_logprobs(ref, batch.input_ids, batch.attention_mask, batch.vocab_size)
        full_pol = next_token_logprobs(policy, batch.input_ids, batch.attention_mask, batch.vocab_size)
    torch.testing.assert_close(batch.ref_logprobs * m, full_ref * m, atol=atol, rtol=0)
    torch.testing.assert_close(batch.logprobs * m, full_pol * m, atol=atol, rtol=0)
    return full_ref, full_pol
