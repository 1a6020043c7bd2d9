"""The generation backends of the chunked path, and the correction for one without exact log-probs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rlhf_env.algorithms.base import correct_sampler_logprobs
from rlhf_env.algorithms.maths import truncated_is_weights
from rlhf_env.algorithms.zoo.grpo import grpo_loss
from rlhf_env.default import make_default_vector_env
from rlhf_env.generation import exact_logprobs
from rlhf_env.rollout import EpisodeStream, collect
from rlhf_env.scoring import next_token_logprobs


def test_truncated_is_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sampler = torch.tensor([[-1.5, -1.0, -1.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = truncated_is_weights(old, sampler, mask, cap=2.0)
    # exp(0.5), exp(-1), exp(1) = 2.718 truncated to 2, off the mask 0
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0, 0.0]]))
    with pytest.raises(ValueError, match="cap C must be > 0"):
        truncated_is_weights(old, sampler, mask, cap=0.0)


def test_grpo_loss_weights_the_surrogate_only():
    gen = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(2, 5, generator=gen) * 0.3 - 1 for _ in range(3))
    adv, mask = torch.tensor([1.0, -0.5]), torch.ones(2, 5)
    plain = grpo_loss(logp, old, ref, adv, mask)
    doubled = grpo_loss(logp, old, ref, adv, mask, tis=torch.full((2, 5), 2.0))
    torch.testing.assert_close(doubled.policy, 2 * plain.policy)
    torch.testing.assert_close(doubled.kl, plain.kl)


@pytest.mark.parametrize("generator", ["kv_cache", "kv_cache_graph", "hf_generate"])
def test_generators_sample_whole_completions_with_the_policy_logprobs(generator):
    env = make_default_vector_env(num_envs=4, max_new_tokens=8, beta=0.1)
    policy = copy.deepcopy(env.ref_model)
    batch = collect(env, policy, seed=1, generator=generator)
    full = next_token_logprobs(policy, batch.input_ids, batch.attention_mask, batch.vocab_size).detach()
    assert batch.num_tokens >= 4 and batch.action_mask.sum(1).min() >= 1  # every row sampled (EOS counts)
    torch.testing.assert_close(batch.logprobs * batch.action_mask, full * batch.action_mask, atol=1e-5, rtol=0)
    # policy == reference: the env's reference log-probs are the sampler's
    torch.testing.assert_close(batch.ref_logprobs, batch.logprobs, atol=1e-5, rtol=0)
    assert exact_logprobs(generator) == generator.startswith("kv_cache")


def test_the_chunked_path_is_one_generation_and_one_reference_pass():
    env = make_default_vector_env(num_envs=4, max_new_tokens=8, beta=0.1)
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def act(self, obs):
            calls.append("act")
            return self.inner.act(obs)

        def generate(self, obs, max_tokens):
            calls.append(("generate", max_tokens))
            return self.inner.generate(obs, max_tokens)

    from rlhf_env.policy import SamplingPolicy

    agent = Counting(SamplingPolicy(env.ref_model, 4, env.pad_token_id, vocab_size=env.vocab_size))
    stream = EpisodeStream(env, agent, seed=0)
    first = [next(iter_) for iter_ in [iter(stream)] for _ in range(4)]
    assert calls == [("generate", 8)] and sorted(ep.row for ep in first) == [0, 1, 2, 3]


def test_a_sampler_mismatch_is_reported_and_corrected():
    env = make_default_vector_env(num_envs=4, max_new_tokens=6, beta=0.0)
    policy = copy.deepcopy(env.ref_model)
    batch = collect(env, policy, seed=2)
    exact = batch.logprobs.clone()
    batch.logprobs = batch.logprobs - 0.5 * batch.action_mask  # a sampler 0.5 nats off on every token
    correct_sampler_logprobs(policy, batch)
    assert batch.logprob_diff == pytest.approx(0.5, abs=1e-5)
    torch.testing.assert_close(batch.logprobs, exact, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch.is_weights[batch.action_mask.bool()].numpy(), math.exp(0.5), rtol=1e-4)
    assert float(batch.is_weights[~batch.action_mask.bool()].abs().sum()) == 0.0


def test_grpo_with_hf_generate_reports_the_mismatch_and_trains():
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.algorithms.zoo import grpo
    from rlhf_env.tasks.arithmetic import make_arithmetic_task
    from rlhf_env.tasks.base_models import load_base_model

    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)  # a shipped base model
    ref, tok = load_base_model(task, device="cpu", progress=False)
    ctx = TrainContext(task, copy.deepcopy(ref).eval(), ref, tok, torch.device("cpu"), generator="hf_generate")
    trainer = grpo.Trainer(ctx, grpo.Config(num_prompts=2, group_size=2, num_minibatches=1))
    torch.manual_seed(0)
    metrics = trainer.step(0, 5)
    assert 0 <= metrics["rollout/logprob_diff"] < 1e-4  # generate's logits agree with the training forward
    assert math.isfinite(metrics["loss/total"]) and metrics["perf/tokens"] > 0


def test_tokens_past_the_position_table_do_not_break_the_ones_before():
    from rlhf_env.fastgen import sample_completions
    from rlhf_env.tiny import build_tiny_model

    model, tok = build_tiny_model(n_positions=8, seed=0)
    ids = torch.tensor([tok("Hello")["input_ids"] + [0] * 3, tok("Hi there")["input_ids"]])  # lengths 5 and 8
    lengths = torch.tensor([5, 8])
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs, _ = sample_completions(
        model, ids, lengths, 4, pad_token_id=0, eos_token_id=None, vocab_size=len(tok), generator=gen
    )
    assert tokens.shape == (2, 4)
    # Row 0 has room for 3 tokens: their log-probs are a full forward's.
    seq = ids[0, :5].tolist() + tokens[0, :3].tolist()
    full = torch.log_softmax(model(torch.tensor([seq])).logits[0, 4:7].float(), dim=-1).detach()
    torch.testing.assert_close(logprobs[0, :3], full.gather(1, tokens[0, :3, None]).squeeze(1), atol=1e-5, rtol=0)


def test_every_clipped_loss_weights_its_policy_term_by_the_truncated_is_weights():
    from rlhf_env.algorithms.zoo import cispo, dapo, gspo, ppo, reinforce_pp

    gen = torch.Generator().manual_seed(1)
    logp, old, ref = (torch.randn(2, 5, generator=gen) * 0.3 - 1 for _ in range(3))
    adv, mask, two = torch.tensor([1.0, -0.5]), torch.ones(2, 5), torch.full((2, 5), 2.0)
    for loss in (dapo.dapo_loss, gspo.gspo_loss, cispo.cispo_loss):  # w_t = 2 on every token: twice the policy term
        torch.testing.assert_close(
            loss(logp, old, ref, adv, mask, tis=two).policy, 2 * loss(logp, old, ref, adv, mask).policy
        )
    token_adv = adv[:, None].expand(2, 5)
    torch.testing.assert_close(
        ppo.policy_loss(logp, old, token_adv, mask, 0.2, two)[0],
        2 * ppo.policy_loss(logp, old, token_adv, mask, 0.2)[0],
    )
    torch.testing.assert_close(
        reinforce_pp.reinforce_pp_loss(logp, old, token_adv, mask, 0.2, two)[0],
        2 * reinforce_pp.reinforce_pp_loss(logp, old, token_adv, mask, 0.2)[0],
    )
    # GSPO weighs a sequence by the geometric mean of its w_t: (1, 4) -> 2, the same as (2, 2).
    mixed = torch.tensor([[1.0, 4.0, 1.0, 4.0, 0.0], [2.0, 2.0, 2.0, 2.0, 0.0]])
    mask4 = torch.tensor([[1.0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(
        gspo.gspo_loss(logp, old, ref, adv, mask4, tis=mixed).policy,
        2 * gspo.gspo_loss(logp, old, ref, adv, mask4).policy,
    )


STUB_GENERATOR = """
from rlhf_env import hookimpl
from rlhf_env.policy import SamplingPolicy


class OneNatLow(SamplingPolicy):
    exact_logprobs = False

    def act(self, obs):
        out = super().act(obs)
        return {**out, "logprob": out["logprob"] - 1.0}

    def generate(self, obs, max_tokens):
        out = super().generate(obs, max_tokens)
        return {**out, "logprob": out["logprob"] - 1.0}


@hookimpl
def rlhf_register_generators(register):
    register("one_nat_low", OneNatLow)
"""


@pytest.mark.parametrize(
    "algo, config",
    [
        ("reinforce", {"num_envs": 16}),  # batches big enough that the scores differ: a gradient to compare
        ("rloo", {"num_prompts": 2, "k": 2}),
        ("ppo", {"num_envs": 16, "num_minibatches": 1, "ppo_epochs": 1, "vf_coef": 0.0}),  # the policy part alone
        ("reinforce_pp", {"num_prompts": 16, "num_minibatches": 1}),
        ("dapo", {"num_prompts": 8, "group_size": 2, "num_minibatches": 1}),  # rows kept over rounds keep their w
        ("gspo", {"num_prompts": 2, "group_size": 2, "num_minibatches": 1}),
    ],
)
def test_on_policy_trainers_correct_an_inexact_sampler(plugin_path, write_dist, algo, config):
    """A plugin generator samples as ``kv_cache`` but reports log-probs 1 nat low (to the env too, whose
    KL-shaped rewards take them): the trainer logs the mismatch, moves the rewards back to π_θold's and
    weights each token by w = min(e¹, 2) = 2, so the policy loss and its gradient are exactly twice
    the exact path's (Adam's first step is scale-free: the weights barely differ)."""
    write_dist(plugin_path, "rlhf_demo_gen", {"stubgen": "rlhf_demo_gen"}, {"rlhf_demo_gen": STUB_GENERATOR})
    from rlhf_env import plugins
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.tasks.arithmetic import make_arithmetic_task
    from rlhf_env.tasks.base_models import load_base_model

    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)  # a shipped base model
    ref, tok = load_base_model(task, device="cpu", progress=False)
    spec = plugins.get_host().algorithms.get(algo)

    def one_step(generator):
        ctx = TrainContext(task, copy.deepcopy(ref).eval(), ref, tok, torch.device("cpu"), generator=generator)
        trainer = spec.Trainer(ctx, spec.Config(**config))
        torch.manual_seed(0)
        return trainer.step(0, 5), ctx.policy

    exact, exact_policy = one_step("kv_cache")
    stub, stub_policy = one_step("one_nat_low")
    assert "rollout/logprob_diff" not in exact and stub["rollout/logprob_diff"] == pytest.approx(1.0, abs=1e-5)
    assert stub["reward/score"] == exact["reward/score"]  # the same samples
    if "objective/return" in exact:  # KL-shaped rewards: back to π_θold's
        assert stub["objective/return"] == pytest.approx(exact["objective/return"], abs=1e-5)
    # (REINFORCE++'s whitened advantages make its loss ~0 at ρ = 1: the gradient carries the check.)
    assert stub["loss/policy"] == pytest.approx(2 * exact["loss/policy"], rel=1e-4, abs=1e-6)
    assert exact["optim/grad_norm"] > 1e-4  # a gradient, not rounding noise (equal scores give none)
    assert stub["optim/grad_norm"] == pytest.approx(2 * exact["optim/grad_norm"], rel=1e-4)
    # Adam's step g/(|g| + ε) is the same for 2g but where |g| is near ε: well under a step of lr.
    for a, b in zip(exact_policy.parameters(), stub_policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_shared_rows_finds_each_distinct_history_once():
    from rlhf_env.kvcache import shared_rows

    # rows 0, 2 and 3 hold [5, 6] in their first two columns (what the padding column holds does
    # not count); row 1 holds [5, 6, 7]
    ids = torch.tensor([[5, 6, 0], [5, 6, 7], [5, 6, 9], [5, 6, 7]])
    real = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    first, inverse = shared_rows(ids, real)
    assert sorted(first.tolist()) == [0, 1]
    assert first[inverse].tolist() == [0, 1, 0, 0]
    # left-padded rows: the same tokens in other columns are another history
    left = torch.tensor([[0, 5, 6], [5, 6, 0]])
    assert shared_rows(left, torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)) is None


def test_a_group_prefills_its_prompt_once_and_samples_as_unshared(monkeypatch):
    """GRPO's copies of a prompt: one prefill row per distinct prompt, in the sampler and the
    reference, and the same tokens and (up to rounding) log-probs as prefilling every copy."""
    import rlhf_env.fastgen as fastgen
    import rlhf_env.kvcache as kvcache

    prompts = [p for p in ("the cat", "a dog") for _ in range(4)]

    def run():
        env = make_default_vector_env(num_envs=8, max_new_tokens=6, beta=0.1)
        policy, gen = copy.deepcopy(env.ref_model), torch.Generator().manual_seed(0)
        for p in policy.parameters():  # a policy apart from the reference, the same in both runs
            p.data.add_(0.05 * torch.randn(p.shape, generator=gen))
        rows = []
        for model in (policy, env.ref_model):
            model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
        return collect(env, policy, seed=3, prompts=prompts), rows

    shared, shared_rows = run()
    wide = [s[0] for s in shared_rows if s[1] > 1]  # forwards of more than one token per row
    assert wide[:2] == [2, 2]  # the two prefills (reference, sampler): 2 distinct prompts each
    monkeypatch.setattr(fastgen, "shared_rows", lambda ids, real: None)
    monkeypatch.setattr(kvcache, "shared_rows", lambda ids, real: None)
    plain, plain_rows = run()
    assert [s[0] for s in plain_rows if s[1] > 1] == [8, 8] + wide[2:]  # the completions' scoring: all 8
    assert torch.equal(shared.input_ids, plain.input_ids)
    for got, want in ((shared.logprobs, plain.logprobs), (shared.ref_logprobs, plain.ref_logprobs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
