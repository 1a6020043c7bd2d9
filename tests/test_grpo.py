"""GRPO and Dr. GRPO: group advantages, the two losses on hand-worked tensors, config
errors, trainer state, and learning on a tiny arithmetic task."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rlhf_env.algorithms.base import AlgorithmSpec, TrainContext
from rlhf_env.algorithms.maths import kl_k3, masked_mean, masked_sum
from rlhf_env.algorithms.run.loop import evaluate_policy, train
from rlhf_env.algorithms.zoo import grpo
from rlhf_env.tasks.arithmetic import make_arithmetic_task
from rlhf_env.tasks.base_models import load_base_model

GRPO = AlgorithmSpec(grpo.Config, grpo.Trainer)
DR_GRPO = AlgorithmSpec(grpo.DrConfig, grpo.DrTrainer)
METRICS = {
    "loss/policy",
    "loss/kl",
    "loss/total",
    "reward/score",
    "reward/group_std",
    "objective/kl",
    "policy/clipfrac",
    "perf/tokens",
}


# -- advantages ------------------------------------------------------------------------------

# Three groups of G = 3: spread 0, 1, 2; all equal; one success out of three.
SCORES = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 1.0, 0.0, 0.0])


def test_group_advantages_by_hand_with_the_sample_std():
    adv = grpo.group_advantages(SCORES, 3, scale_by_std=True, eps=1e-12)
    # group 1: mean 1, sample std 1; group 2: 0 (no NaN); group 3: mean 1/3, deviations
    # (2/3, −1/3, −1/3), sample var (4/9 + 1/9 + 1/9) / 2 = 1/3, std 1/√3.
    third = 1 / math.sqrt(3)
    want = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2 * third, -third, -third]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    assert not torch.isnan(adv).any()
    torch.testing.assert_close(grpo.group_std(SCORES, 3), torch.tensor([1.0, 0.0, third]))


def test_group_advantages_eps_and_equal_groups():
    adv = grpo.group_advantages(SCORES, 3, scale_by_std=True, eps=1.0)  # std + eps
    torch.testing.assert_close(adv[:3], torch.tensor([-0.5, 0.0, 0.5]))
    # Equal rewards whose float mean is not exactly the reward: still ~0, never NaN or ±0.8.
    tenths = torch.full((4,), 0.1)
    adv = grpo.group_advantages(tenths, 4, scale_by_std=True, eps=1e-4)
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e-3


def test_dr_grpo_advantages_are_not_scaled_by_the_std():
    adv = grpo.group_advantages(SCORES, 3, scale_by_std=False)
    want = [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2 / 3, -1 / 3, -1 / 3]
    torch.testing.assert_close(adv, torch.tensor(want))


def test_group_advantages_reject_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        grpo.group_advantages(torch.zeros(6), 4)


# -- losses ------------------------------------------------------------------------------------

# Two completions in (B=2, T=5) action coordinates: position 0 is a prompt position, row 0
# has 2 completion tokens then padding, row 1 has 3. N = max_new_tokens = 4.
MASK = torch.tensor([[0.0, 1, 1, 0, 0], [0.0, 1, 1, 1, 0]])
N = 4
JUNK = 5.0  # what sits outside the mask: it must change nothing


def on_policy(values=(0.5, 0.5)):
    """logp = old = ref on completion tokens, junk elsewhere."""
    logp = torch.where(MASK.bool(), torch.log(torch.tensor(values[0])), torch.tensor(JUNK))
    old = torch.where(MASK.bool(), logp, torch.tensor(-JUNK))
    ref = torch.where(MASK.bool(), logp, torch.tensor(2 * JUNK))
    return logp.clone().requires_grad_(True), old, ref


def test_clipped_surrogate_takes_the_pessimistic_branch():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]])
    adv_pos, adv_neg = torch.tensor([1.0]), torch.tensor([-1.0])
    old = torch.zeros_like(ratios)
    s_pos, clipped = grpo.clipped_surrogate(ratios.log(), old, adv_pos, clip_eps=0.2)
    s_neg, clipped_neg = grpo.clipped_surrogate(ratios.log(), old, adv_neg, clip_eps=0.2)
    # Â > 0: min(ρ, clip ρ) -> 1.2 (clipped), 0.5 (not); Â < 0: min(−ρ, −clip ρ) -> −1.5, −0.8.
    torch.testing.assert_close(s_pos, torch.tensor([[1.2, 1.2, 0.5, 0.5, 1.1]]))
    torch.testing.assert_close(s_neg, torch.tensor([[-1.5, -1.5, -0.8, -0.8, -1.1]]))
    # "Clipped" = clipping changed the objective (docs/maths.md §5), not "ρ outside [1−ε, 1+ε]":
    # ρ = 0.5 with Â > 0 and ρ = 1.5 with Â < 0 keep ρÂ, so they do not count.
    assert clipped.tolist() == [[True, True, False, False, False]]
    assert clipped_neg.tolist() == [[False, False, True, True, False]]


def test_grpo_loss_averages_each_completion_over_its_own_tokens():
    logp, old, ref = on_policy()
    adv = torch.tensor([1.0, -1.0])
    parts = grpo.grpo_loss(logp, old, ref, adv, MASK, clip_eps=0.2, kl_coef=0.1)
    # ρ = 1, k3 = 0: objective = ½ (mean_t Â_0 + mean_t Â_1) = ½ (1 − 1) = 0.
    assert parts.loss.item() == pytest.approx(0.0, abs=1e-7)
    assert parts.kl.item() == pytest.approx(0.0, abs=1e-7) and parts.clipfrac.item() == 0.0
    parts.loss.backward()
    # ∂loss/∂logp_t = −Â_i / (|y_i| B): −1/4 on row 0's two tokens, +1/6 on row 1's three.
    want = torch.tensor([[0, -1 / 4, -1 / 4, 0, 0], [0, 1 / 6, 1 / 6, 1 / 6, 0]])
    torch.testing.assert_close(logp.grad, want)


def test_dr_grpo_loss_sums_tokens_over_a_constant():
    logp, old, ref = on_policy()
    adv = torch.tensor([1.0, -1.0])
    parts = grpo.dr_grpo_loss(logp, old, ref, adv, MASK, max_new_tokens=N, clip_eps=0.2, kl_coef=0.1)
    # objective = (2·1 + 3·(−1)) / (N·B) = −1/8: the longer, worse completion now weighs more.
    assert parts.loss.item() == pytest.approx(1 / 8)
    assert parts.policy.item() == pytest.approx(1 / 8)
    parts.loss.backward()
    want = torch.tensor([[0, -1 / 8, -1 / 8, 0, 0], [0, 1 / 8, 1 / 8, 1 / 8, 0]])  # −Â_i / (N·B) per token
    torch.testing.assert_close(logp.grad, want)


def test_k3_penalty_enters_the_loss_with_a_plus_sign():
    logp, old, _ = on_policy()
    # Row 0's tokens: π = 0.5, π_ref = 0.25 -> k3 = 0.5 − log 0.5 − 1; row 1: π_ref = π -> 0.
    ref = torch.where(MASK.bool(), torch.log(torch.tensor(0.5)), torch.tensor(JUNK))
    ref[0, 1:3] = math.log(0.25)
    k3 = 0.5 - math.log(0.5) - 1
    adv = torch.zeros(2)
    g = grpo.grpo_loss(logp, old, ref, adv, MASK, kl_coef=0.1)
    assert g.kl.item() == pytest.approx(0.1 * (k3 + 0.0) / 2)  # mean over tokens, then completions
    assert g.loss.item() == pytest.approx(g.kl.item()) and g.policy.item() == pytest.approx(0.0)
    d = grpo.dr_grpo_loss(logp, old, ref, adv, MASK, max_new_tokens=N, kl_coef=0.1)
    assert d.kl.item() == pytest.approx(0.1 * 2 * k3 / (N * 2))
    g.loss.backward()
    # ∂k3/∂logp = 1 − π_ref/π = ½ > 0: minimising pushes log π down, toward π_ref.
    assert (logp.grad[0, 1:3] > 0).all() and logp.grad[1].abs().max() == 0
    assert grpo.grpo_loss(logp, old, ref, adv, MASK, kl_coef=0.0).loss.item() == 0.0


def test_the_two_losses_differ_only_in_the_token_aggregation():
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(2, 5, generator=gen) * 0.3 - 1).requires_grad_(True)
    old, ref = torch.randn(2, 5, generator=gen) * 0.3 - 1, torch.randn(2, 5, generator=gen) * 0.3 - 1
    adv = torch.tensor([0.7, -1.3])
    surrogate, _ = grpo.clipped_surrogate(logp, old, adv, 0.2)
    per_token = surrogate - 0.05 * kl_k3(logp, ref)
    g = grpo.grpo_loss(logp, old, ref, adv, MASK, clip_eps=0.2, kl_coef=0.05)
    d = grpo.dr_grpo_loss(logp, old, ref, adv, MASK, max_new_tokens=N, clip_eps=0.2, kl_coef=0.05)
    torch.testing.assert_close(g.loss, -masked_mean(per_token, MASK, 1).mean())
    torch.testing.assert_close(d.loss, -masked_sum(per_token, MASK) / (N * 2))
    torch.testing.assert_close(g.loss, g.policy + g.kl)
    torch.testing.assert_close(d.loss, d.policy + d.kl)
    # With every completion at the full budget the two aggregations coincide.
    full = torch.ones(2, 5)
    torch.testing.assert_close(
        grpo.grpo_loss(logp, old, ref, adv, full).loss,
        grpo.dr_grpo_loss(logp, old, ref, adv, full, max_new_tokens=5).loss,
    )


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [GRPO, DR_GRPO], ids=["grpo", "dr_grpo"])
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"group_size": 1}, "GRPO needs group_size >= 2"),
        ({"kl_coef": -0.01}, r"kl_coef \(β\) must be >= 0"),
        ({"clip_eps": 0.0}, "clip_eps must be > 0"),
        ({"clip_eps": -0.1}, "clip_eps must be > 0"),
        ({"num_minibatches": 3}, "must divide"),
        ({"std_eps": 0.0}, "std_eps must be > 0"),
    ],
)
def test_impossible_config_is_an_error(spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        spec.make_config(**overrides)


def test_bad_config_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    with pytest.raises(ValueError, match="GRPO needs group_size >= 2"):
        train(GRPO, task, tmp_path / "run", steps=3, config={"group_size": 1}, progress=False, device="cpu")
    assert not (tmp_path / "cache").exists()  # no base model was built


# -- trainer -----------------------------------------------------------------------------------


@pytest.fixture
def task():
    """1-digit addition (its base model is the committed fixture, see conftest); evaluated on
    the first 64 training prompts (what the policy trains on)."""
    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    return dataclasses.replace(task, eval_prompts=task.train_prompts[:64])


@pytest.mark.parametrize("spec", [GRPO, DR_GRPO], ids=["grpo", "dr_grpo"])
def test_state_dict_round_trip_continues_identically(task, spec):
    ref, tokenizer = load_base_model(task, device="cpu")
    config = spec.make_config(num_prompts=2, group_size=4, num_iterations=2, num_minibatches=2)

    def trainer_on(policy):
        return spec.Trainer(TrainContext(task, policy, ref, tokenizer, torch.device("cpu")), config)

    first = trainer_on(copy.deepcopy(ref).eval())
    metrics = first.step(0, 11)
    assert METRICS <= metrics.keys() and all(math.isfinite(v) for v in metrics.values())
    assert metrics["perf/tokens"] > 0 and 0 <= metrics["policy/clipfrac"] <= 1
    second = trainer_on(copy.deepcopy(first.ctx.policy))
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    torch.manual_seed(5)
    a = first.step(1, 12)
    torch.manual_seed(5)
    b = second.step(1, 12)
    assert a == b
    for p, q in zip(first.ctx.policy.parameters(), second.ctx.policy.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("spec", "config"), [(GRPO, {"lr": 1e-4}), (DR_GRPO, {})], ids=["grpo", "dr_grpo"])
def test_learns_one_digit_addition(learning_task, tmp_path, spec, config, learning):
    """150 steps, gold on the training prompts × 4 (320 samples, ±0.03) against the base model's
    on the same samples. GRPO at lr 1e-4, the arithmetic suites' setting: at its default 3e-4 the
    gold swung by up to 0.14 between evaluations 15 steps apart (0.669 → 0.528 on AVX2, seed 0),
    as PPO's did (docs/maths.md §5): GRPO divides binary advantages by the group's std (≤ 0.5), so
    its step is 2-3× Dr. GRPO's at one lr. Measured over seeds 0-2 and two kernels at 1e-4:
    0.39 → 0.62-0.66, rising at every evaluation; Dr. GRPO at its default: see
    benchmarks/results/learning_check.md."""
    ref, tokenizer = load_base_model(learning_task, device="cpu")
    base = evaluate_policy(TrainContext(learning_task, ref, ref, tokenizer, torch.device("cpu")), 320)["reward/gold"]
    kw = dict(eval_every=150, eval_prompts=320, progress=False, device="cpu", seed=learning.seed)
    records = train(spec, learning_task, tmp_path / "run", steps=150, config=config, **kw)
    learning.check(records[-1]["reward/gold"], base + 0.1)
    assert 0 < records[-1]["objective/kl_eval"] < 5  # moved away from the reference, not blown up
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["loss/kl"]) for r in records)
