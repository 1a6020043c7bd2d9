"""PPO by hand: clipped surrogate, value loss, GAE on completion runs, the KL controller, the
config, a state round trip with the value head, and a learning run on 1-digit addition."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rlhf_env.algorithms.base import AlgorithmSpec, TrainContext
from rlhf_env.algorithms.run.loop import evaluate_policy, train
from rlhf_env.algorithms.zoo import ppo
from rlhf_env.tasks.arithmetic import make_arithmetic_task
from rlhf_env.tasks.base_models import load_base_model

SPEC = AlgorithmSpec(ppo.Config, ppo.Trainer)
METRICS = {
    "loss/policy",
    "loss/value",
    "loss/total",
    "reward/score",
    "objective/kl",
    "objective/kl_coef",
    "policy/clipfrac",
    "policy/approx_kl",
    "perf/tokens",
}
L = math.log

# -- losses ------------------------------------------------------------------------------------


def surrogate_inputs():
    """Two rows in action coordinates: row 0's run starts at column 1, row 1's ends at column 1.

    ratios ρ and advantages Â on the real tokens: (1.5, +1) clipped to 1.2; (0.5, +1) kept, 0.5;
    (1.1, −2) inside the range, −2.2; (0.5, −1) clipped to −0.8. Padding has ρ = 3, Â = 50.
    """
    logprobs = torch.tensor([[L(3.0), L(1.5), L(0.5)], [L(1.1), L(0.5), L(3.0)]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[50.0, 1.0, 1.0], [-2.0, -1.0, 50.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logprobs, old, adv, mask


def test_policy_loss_by_hand_and_padding_does_not_count():
    logprobs, old, adv, mask = surrogate_inputs()
    loss, clipfrac = ppo.policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    # −mean(1.2, 0.5, −2.2, −0.8) = 1.3 / 4
    assert loss.item() == pytest.approx(0.325, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # d/dlogπ of −ρÂ/4 on the unclipped tokens only: −0.5/4 and +2.2/4; clipped and padding get 0.
    expected = torch.tensor([[0.0, 0.0, -0.125], [0.55, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    adv = torch.tensor([[1.0, -3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, mask, clip_eps=0.1)
    assert loss.item() == pytest.approx(1.0) and clipfrac.item() == 0.0


def value_inputs():
    """Tokens (V, V_old, R̂): (1, .5, 0), (1, .5, 1), (.6, .5, 2); padding (10, 0, −10)."""
    values = torch.tensor([[10.0, 1.0, 1.0], [0.6, 10.0, 10.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.0]])
    returns = torch.tensor([[-10.0, 0.0, 1.0], [2.0, -10.0, -10.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return values, old, returns, mask


def test_value_loss_unclipped_by_hand():
    values, old, returns, mask = value_inputs()
    loss = ppo.value_loss(values, old, returns, mask, clip_value=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.0 + 1.96) / 3, abs=1e-6)
    loss.backward()  # d/dV ½ mean (V − R̂)² = (V − R̂)/3
    assert torch.allclose(values.grad, torch.tensor([[0.0, 1 / 3, 0.0], [-1.4 / 3, 0.0, 0.0]]), atol=1e-6)


def test_value_loss_clipped_takes_the_larger_error():
    values, old, returns, mask = value_inputs()
    loss = ppo.value_loss(values, old, returns, mask, clip_value=0.2)
    # clip(V, V_old ± .2) = .7, .7, .6 → errors max(1, .49) = 1, max(0, .09) = .09, 1.96
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.09 + 1.96) / 3, abs=1e-6)
    loss.backward()  # the second token's larger error is the clipped one: no gradient to V
    assert torch.allclose(values.grad, torch.tensor([[0.0, 1 / 3, 0.0], [-1.4 / 3, 0.0, 0.0]]), atol=1e-6)


# -- GAE on action coordinates -----------------------------------------------------------------


def gae_loop(rewards, values, gamma, lam):
    """GAE for one completion (plain lists), straight from the definition; V = 0 after the end."""
    n = len(rewards)
    adv = []
    for t in range(n):
        total = 0.0
        for k in range(n - t):
            v_next = values[t + k + 1] if t + k + 1 < n else 0.0
            total += (gamma * lam) ** k * (rewards[t + k] + gamma * v_next - values[t + k])
        adv.append(total)
    return adv


def test_gae_hand_worked_three_tokens_after_a_prompt():
    # Columns 0-1 are prompt, 2-4 the completion, 5 padding; junk outside the run must not leak.
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[5.0, 5.0, -0.1, 0.0, 1.0, 5.0]])
    values = torch.tensor([[7.0, 7.0, 0.5, 0.4, 0.6, 7.0]])
    adv, ret = ppo.advantages_and_returns(rewards, values, mask, gamma=1.0, gae_lambda=0.5, whiten=False)
    # δ = (−0.1 + 0.4 − 0.5, 0 + 0.6 − 0.4, 1 − 0.6) = (−0.2, 0.2, 0.4)
    # Â_2 = 0.4, Â_1 = 0.2 + 0.5·0.4 = 0.4, Â_0 = −0.2 + 0.5·0.4 = 0
    assert adv[0].tolist() == pytest.approx([0, 0, 0.0, 0.4, 0.4, 0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0, 0, 0.5, 0.8, 1.0, 0], abs=1e-6)


def random_runs(B=6, T=9, seed=0):
    """Random rewards/values with one contiguous run per row, anywhere in the row (and one empty)."""
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    runs = [(0, 9), (3, 4), (2, 1), (5, 0), (1, 7), (8, 1)]  # (start, length)
    mask = torch.zeros(B, T)
    for b, (s, n) in enumerate(runs):
        mask[b, s : s + n] = 1
    return rewards, values, mask, runs


def test_vectorised_gae_matches_the_plain_loop_on_runs_anywhere_in_the_row():
    rewards, values, mask, runs = random_runs()
    adv, ret = ppo.advantages_and_returns(rewards, values, mask, gamma=0.9, gae_lambda=0.8, whiten=False)
    for b, (s, n) in enumerate(runs):
        expected = gae_loop(rewards[b, s : s + n].tolist(), values[b, s : s + n].tolist(), 0.9, 0.8)
        assert adv[b, s : s + n].tolist() == pytest.approx(expected, abs=1e-5)
        returns = [a + v for a, v in zip(expected, values[b, s : s + n].tolist())]
        assert ret[b, s : s + n].tolist() == pytest.approx(returns, abs=1e-5)
        outside = torch.ones(mask.shape[1], dtype=torch.bool)
        outside[s : s + n] = False
        assert (adv[b, outside] == 0).all() and (ret[b, outside] == 0).all()


def test_gae_on_a_run_equals_gae_on_the_same_run_shifted_to_a_prefix():
    rewards, values, mask, runs = random_runs(seed=1)
    shift = lambda x: torch.stack([torch.roll(x[b], -s) for b, (s, _) in enumerate(runs)])  # noqa: E731
    adv, ret = ppo.advantages_and_returns(rewards, values, mask, gamma=1.0, gae_lambda=0.95, whiten=False)
    adv_p, ret_p = ppo.advantages_and_returns(shift(rewards), shift(values), shift(mask), 1.0, 0.95, whiten=False)
    assert (shift(mask)[:, 0] >= shift(mask)[:, -1]).all()  # a prefix layout now
    assert torch.allclose(shift(adv), adv_p, atol=1e-6) and torch.allclose(shift(ret), ret_p, atol=1e-6)


def test_whitening_uses_completion_tokens_only_and_keeps_the_raw_returns():
    rewards, values, mask, _ = random_runs(seed=2)
    raw, ret = ppo.advantages_and_returns(rewards, values, mask, 0.9, 0.8, whiten=False)
    adv, ret_w = ppo.advantages_and_returns(rewards, values, mask, 0.9, 0.8, whiten=True)
    real = mask.bool()
    assert adv[real].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert adv[real].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (adv[~real] == 0).all() and torch.equal(ret, ret_w)
    assert torch.allclose(adv[real], (raw[real] - raw[real].mean()) / raw[real].std(unbiased=False), atol=1e-5)


# -- KL controller and config ------------------------------------------------------------------


def test_adaptive_kl_controller_follows_ziegler():
    ctl = ppo.AdaptiveKLController(0.1, target=2.0, horizon=100)
    ctl.update(3.0, n_steps=10)  # e = clip(3/2 − 1, ±0.2) = 0.2 → β·(1 + 0.2·10/100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(1.5, n_steps=10)  # e = −0.25 → −0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    ctl.update(2.2, n_steps=50)  # e = 0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)
    fixed = ppo.FixedKLController(0.3)
    fixed.update(100.0, 64)
    assert fixed.value == 0.3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"clip_eps": 0.0}, "clip_eps must be > 0"),
        ({"clip_eps": -0.1}, "clip_eps must be > 0"),
        ({"kl_coef": -0.01}, "kl_coef must be >= 0"),
        ({"gamma": 1.01}, "gamma must be in"),
        ({"gamma": -0.1}, "gamma must be in"),
        ({"gae_lambda": 1.5}, "gae_lambda must be in"),
        ({"gae_lambda": float("nan")}, "gae_lambda: expected a finite number"),  # refused before __post_init__
        ({"lr": 0.0}, "lr must be > 0"),
        ({"num_envs": 0}, "num_envs must be >= 1"),
        ({"num_envs": 4, "num_minibatches": 5}, "num_minibatches must be in"),
        ({"ppo_epochs": 0}, "ppo_epochs must be >= 1"),
        ({"clip_value": 0.0}, "clip_value must be > 0 or None"),
        ({"vf_coef": -1.0}, "vf_coef must be >= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"adaptive_kl": True, "target_kl": 0.0}, "target_kl must be > 0"),
        ({"adaptive_kl": True, "kl_horizon": 0}, "kl_horizon must be > 0"),
        ({"adaptive_kl": True, "kl_coef": 0.0}, "adaptive_kl needs kl_coef > 0"),
    ],
)
def test_impossible_config_is_an_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        SPEC.make_config(**overrides)


def test_config_defaults_are_valid():
    c = ppo.Config()
    assert c.clip_value is not None and c.whiten_advantages and not c.adaptive_kl
    ppo.Config(clip_value=None, gamma=0.0, gae_lambda=1.0, kl_coef=0.0)  # the edges are allowed


def test_bad_config_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    with pytest.raises(ValueError, match="clip_eps"):
        train(SPEC, task, tmp_path / "run", steps=1, progress=False, device="cpu", config={"clip_eps": 0})
    assert not (tmp_path / "cache").exists()  # no base model was built


# -- trainer -----------------------------------------------------------------------------------


@pytest.fixture
def task():
    """1-digit addition (its base model is the committed fixture, see conftest); evaluated on
    the first 64 training prompts (what the policy trains on)."""
    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    return dataclasses.replace(task, eval_prompts=task.train_prompts[:64])


def test_value_head_starts_at_zero_and_one_forward_gives_logprobs_and_values(task):
    ref, tokenizer = load_base_model(task, device="cpu")
    trainer = ppo.Trainer(
        TrainContext(task, copy.deepcopy(ref).eval(), ref, tokenizer, torch.device("cpu")),
        ppo.Config(num_envs=4, num_minibatches=2),
    )
    assert trainer.value_head.weight.shape == (1, ref.config.hidden_size)
    assert not trainer.value_head.weight.any() and not trainer.value_head.bias.any()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    attn = (ids != 0).long()
    with torch.no_grad():
        logprobs, values = ppo.logprobs_and_values(trainer.ctx.policy, trainer.value_head, ids, attn)
        expected = ppo.token_logprobs(ref(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])
    assert logprobs.shape == values.shape == (2, 3)
    assert torch.allclose(logprobs, expected) and not values.any()
    head_params = {id(p) for p in trainer.value_head.parameters()}
    assert head_params <= {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


def test_state_dict_round_trip_with_value_head_and_kl_controller(task, tmp_path):
    ref, tokenizer = load_base_model(task, device="cpu")
    config = ppo.Config(
        num_envs=8, num_minibatches=2, ppo_epochs=2, adaptive_kl=True, kl_coef=0.1, target_kl=0.01, kl_horizon=40
    )

    def trainer_on(policy):
        return ppo.Trainer(TrainContext(task, policy, ref, tokenizer, torch.device("cpu")), config)

    first = trainer_on(copy.deepcopy(ref).eval())
    metrics = first.step(0, 11)
    assert METRICS <= metrics.keys() and all(math.isfinite(v) for v in metrics.values())
    assert metrics["perf/tokens"] > 0 and 0 <= metrics["policy/clipfrac"] <= 1
    assert metrics["objective/kl_coef"] == pytest.approx(0.1)
    assert first.value_head.weight.any()  # the head has learned something
    assert first.kl_ctl.value != pytest.approx(0.1)  # and the controller moved β

    path = tmp_path / "trainer_state.pt"
    torch.save(first.state_dict(), path)  # as the loop checkpoints it
    second = trainer_on(copy.deepcopy(first.ctx.policy))
    second.load_state_dict(torch.load(path, weights_only=False))
    assert torch.equal(second.value_head.weight, first.value_head.weight)
    assert second.kl_ctl.value == first.kl_ctl.value == second.env.core.beta

    beta = second.kl_ctl.value
    torch.manual_seed(5)
    a = first.step(1, 12)
    torch.manual_seed(5)
    b = second.step(1, 12)
    assert a == b and a["objective/kl_coef"] == beta  # the rollout ran with the restored β
    assert torch.equal(first.value_head.weight, second.value_head.weight)
    for p, q in zip(first.ctx.policy.parameters(), second.ctx.policy.parameters()):
        assert torch.equal(p, q)


def test_resumed_run_reproduces_an_uninterrupted_one(task, tmp_path):
    """The loop's checkpoint carries the value head, Adam's moments and the controller's β."""
    volatile = ("perf/tokens_per_s", "perf/step_time_s", "time/elapsed_s")
    stable = lambda records: [{k: v for k, v in r.items() if k not in volatile} for r in records]  # noqa: E731
    config = {"num_envs": 8, "num_minibatches": 2, "adaptive_kl": True, "target_kl": 0.05, "kl_horizon": 50}
    kw = dict(eval_every=3, eval_prompts=16, checkpoint_every=3, progress=False, device="cpu", config=config)
    whole = train(SPEC, task, tmp_path / "whole", steps=6, **kw)
    train(SPEC, task, tmp_path / "split", steps=3, **kw)
    resumed = train(SPEC, task, tmp_path / "split", steps=6, resume=True, **kw)
    assert stable(resumed) == stable(whole)
    assert len({r["objective/kl_coef"] for r in whole}) == 6  # β moved every step


def test_learns_one_digit_addition(learning_task, tmp_path, learning):
    """Default config (lr 1e-4), 50 rollouts, gold on the training prompts × 4 (320 samples,
    ±0.03) after 25 and 50. The gold must rise past the base at both and keep rising between
    them: at the former lr 3e-4 it swung by ±0.1 between evaluations (an AVX-512 run read 0.656
    at 25 and 0.516 at 50; docs/maths.md §5). Measured at lr 1e-4 (see the closing figures in
    benchmarks/results/learning_check.md): base 0.39."""
    ref, tokenizer = load_base_model(learning_task, device="cpu")
    ctx = TrainContext(learning_task, ref, ref, tokenizer, torch.device("cpu"))
    base = evaluate_policy(ctx, 320)["reward/gold"]
    kw = dict(eval_every=25, eval_prompts=320, progress=False, device="cpu", seed=learning.seed)
    records = train(SPEC, learning_task, tmp_path / "run", steps=50, **kw)
    gold = [r["reward/gold"] for r in records if "reward/gold" in r]
    assert len(gold) == 2
    learning.check(gold[0], base + 0.08, "reward/gold at 25")
    learning.check(gold[1], base + 0.12, "reward/gold at 50")
    learning.check(gold[1] - gold[0], -0.04, "gold rise 25 -> 50")  # no fall beyond the eval noise
    assert 0 < records[-1]["objective/kl_eval"] < 5  # moved away from the reference, not blown up
    assert all(math.isfinite(r["loss/total"]) for r in records)
