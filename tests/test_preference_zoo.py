"""IPO, SimPO, KTO and online DPO: the losses by hand, config errors, the trainers on tiny
models, `rlhf list`, and learning on one-digit addition."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from tinyparts import count_e, tiny_pair

from rlhf_env import plugins
from rlhf_env.algorithms.base import AlgorithmSpec, TrainContext
from rlhf_env.algorithms.run.loop import evaluate_policy, train
from rlhf_env.algorithms.zoo import dpo, kto, online_dpo
from rlhf_env.plugins import cli
from rlhf_env.tasks.arithmetic import make_arithmetic_task
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.base_models import load_base_model

IPO = AlgorithmSpec(dpo.IPOConfig, dpo.IPOTrainer)
SIMPO = AlgorithmSpec(dpo.SimPOConfig, dpo.SimPOTrainer)
KTO = AlgorithmSpec(kto.Config, kto.Trainer)
ONLINE_DPO = AlgorithmSpec(online_dpo.Config, online_dpo.Trainer)
CPU = torch.device("cpu")


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# -- the losses by hand -------------------------------------------------------------------------


def test_ipo_loss_values_and_gradients_by_hand():
    # τ = 0.5: target margin 1/(2τ) = 1. Row 0 sits on the target (h = 0.5 − (−0.5) = 1): no
    # loss, no gradient. Row 1 is the wrong way round (h = −1): (−1 − 1)² = 4.
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], requires_grad=True)
    ref = torch.full((2,), -1.5)
    loss, chosen, rejected = dpo.ipo_loss(pc, pr, ref, ref, tau=0.5)
    assert loss.item() == pytest.approx((0 + 4) / 2)
    loss.backward()
    # dL/dπ+_i = 2(h_i − 1)/B = (0, −2); dL/dπ−_i = −2(h_i − 1)/B = (0, 2).
    assert pc.grad.tolist() == pytest.approx([0.0, -2.0]) and pr.grad.tolist() == pytest.approx([0.0, 2.0])
    assert chosen.tolist() == pytest.approx([0.25, -0.25]) and rejected.tolist() == pytest.approx([-0.25, 0.25])
    # Past the target the loss pushes back (DPO's would keep pushing): h = 3 → gradient +2·2/1 on π+.
    over = torch.tensor([1.5], requires_grad=True)
    dpo.ipo_loss(over, torch.tensor([-1.5]), torch.zeros(1), torch.zeros(1), tau=0.5)[0].backward()
    assert over.grad.item() == pytest.approx(4.0)


def test_simpo_loss_values_and_gradients_by_hand():
    # β = 2, γ = 0.5. Rewards β log π / |y|: chosen (−2, −2), rejected (−4, −2).
    # z = (−2 + 4 − 0.5, −2 + 2 − 0.5) = (1.5, −0.5).
    pc = torch.tensor([-2.0, -3.0], requires_grad=True)
    pr = torch.tensor([-6.0, -1.0], requires_grad=True)
    lc, lr = torch.tensor([2.0, 3.0]), torch.tensor([3.0, 1.0])
    loss, chosen, rejected = dpo.simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.5)) + math.log1p(math.exp(0.5))) / 2)
    assert chosen.tolist() == pytest.approx([-2.0, -2.0]) and rejected.tolist() == pytest.approx([-4.0, -2.0])
    loss.backward()
    # dL/dπ+_i = −σ(−z_i) β/|y+_i| / B, dL/dπ−_i = +σ(−z_i) β/|y−_i| / B.
    s = [sigmoid(-1.5), sigmoid(0.5)]
    assert pc.grad.tolist() == pytest.approx([-s[0] * 2 / 2 / 2, -s[1] * 2 / 3 / 2])
    assert pr.grad.tolist() == pytest.approx([s[0] * 2 / 3 / 2, s[1] * 2 / 1 / 2])


def test_simpo_sft_weight_adds_the_chosen_nll_per_token_by_hand():
    # The example above with α = 0.5: log π(y+)/|y+| = (−2/2, −3/3) = (−1, −1), so the NLL term is
    # −α mean(−1, −1) = +0.5; it pulls the chosen up by α/(B|y+_i|) and leaves the rejected alone.
    pc = torch.tensor([-2.0, -3.0], requires_grad=True)
    pr = torch.tensor([-6.0, -1.0], requires_grad=True)
    lc, lr = torch.tensor([2.0, 3.0]), torch.tensor([3.0, 1.0])
    loss, chosen, rejected = dpo.simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5, sft_weight=0.5)
    simpo = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(simpo + 0.5)
    assert chosen.tolist() == pytest.approx([-2.0, -2.0]) and rejected.tolist() == pytest.approx([-4.0, -2.0])
    loss.backward()
    s = [sigmoid(-1.5), sigmoid(0.5)]
    assert pc.grad.tolist() == pytest.approx([-s[0] * 2 / 2 / 2 - 0.5 / 2 / 2, -s[1] * 2 / 3 / 2 - 0.5 / 2 / 3])
    assert pr.grad.tolist() == pytest.approx([s[0] * 2 / 3 / 2, s[1] * 2 / 1 / 2])


def test_kto_loss_values_and_gradients_by_hand():
    # β = 2, z₀ = 0.25, λ_D = 1, λ_U = 1.5; r = π − π_ref = (0.5, −0.5, −1).
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.5, -2.0])
    desirable = torch.tensor([True, False, False])
    loss, rewards = kto.kto_loss(policy, ref, desirable, torch.tensor(0.25), 2.0, 1.0, 1.5)
    # desirable: 1 − σ(2(0.5 − 0.25)) = 1 − σ(0.5); undesirable: 1.5(1 − σ(2(0.25 + 0.5))), 1.5(1 − σ(2.5)).
    z = [0.5, 1.5, 2.5]
    want = ((1 - sigmoid(z[0])) + 1.5 * (1 - sigmoid(z[1])) + 1.5 * (1 - sigmoid(z[2]))) / 3
    assert loss.item() == pytest.approx(want) and rewards.tolist() == pytest.approx([0.5, -0.5, -1.0])
    loss.backward()
    # d/dr of −λσ(±β(r − z₀)) = ∓λβσ'(·), σ' = σ(1 − σ); a desirable example is pulled up, undesirable pushed down.
    d = [sigmoid(v) * (1 - sigmoid(v)) for v in z]
    assert policy.grad.tolist() == pytest.approx([-2 * d[0] / 3, 1.5 * 2 * d[1] / 3, 1.5 * 2 * d[2] / 3])


def test_kto_reference_point_is_a_clamped_detached_mean():
    pol = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = kto.kto_reference_point(pol, torch.tensor([-2.0, -2.5]))
    assert z0.item() == pytest.approx(0.75) and not z0.requires_grad  # mean(1, 0.5)
    assert kto.kto_reference_point(torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.5])).item() == 0.0


def test_online_dpo_ranks_pairs_and_drops_ties():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 2.0, 3.0])  # prompt 1 ties
    chosen, rejected = online_dpo.rank_pairs(scores)
    assert chosen.tolist() == [0, 5, 7] and rejected.tolist() == [1, 4, 6]
    with pytest.raises(ValueError, match="two samples per prompt"):
        online_dpo.rank_pairs(torch.zeros(3))


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (IPO, {"tau": 0.0}, "IPO tau must be > 0"),
        (IPO, {"lr": -1.0}, "IPO lr and max_grad_norm must be > 0"),
        (IPO, {"beta": 1.0}, "unknown config keys"),
        (SIMPO, {"beta": 0.0}, "SimPO beta must be > 0"),
        (SIMPO, {"gamma": -0.1}, "SimPO gamma"),
        (SIMPO, {"sft_weight": -1.0}, "SimPO sft_weight"),
        (SIMPO, {"batch_size": 0}, "SimPO batch_size and num_pairs must be >= 1"),
        (KTO, {"beta": -1.0}, "KTO beta must be > 0"),
        (KTO, {"undesirable_weight": 0.0}, "KTO desirable_weight and undesirable_weight"),
        (KTO, {"annotator_tau": 0.0}, "KTO annotator_tau"),
        (ONLINE_DPO, {"num_prompts": 0}, "online DPO num_prompts must be >= 1"),
        (ONLINE_DPO, {"beta": 0.0}, "online DPO beta must be > 0"),
        (ONLINE_DPO, {"max_grad_norm": 0.0}, "online DPO lr and max_grad_norm"),
    ],
)
def test_impossible_config_is_an_error(spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        spec.make_config(**overrides)


def test_list_shows_the_preference_algorithms(monkeypatch, capsys):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.reset_host()
    try:
        assert cli.main(["list"]) == 0
    finally:
        plugins.reset_host()
    listed = {
        line.split()[0] for line in capsys.readouterr().out.splitlines() if "rlhf_env.algorithms.builtins" in line
    }
    assert {"ipo", "simpo", "kto", "online_dpo"} <= listed
    host = plugins.get_host()
    for name, words in [("ipo", "1/(2τ)"), ("simpo", "reference-free"), ("kto", "unpaired"), ("online_dpo", "current")]:
        assert words in host.algorithms.get(name).description


# -- trainers on tiny models -----------------------------------------------------------------------


def tiny_ctx(reward=count_e):
    _, ref, tok = tiny_pair()
    task = Task("tiny", ["ab", "cd", "ef", "gh"], ["ij"], reward, [("ab", "e")], max_new_tokens=4)
    return TrainContext(task, copy.deepcopy(ref).eval(), ref, tok, CPU, seed=0)


class NoForward(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("SimPO ran the reference model")


def test_ipo_and_simpo_start_from_their_known_losses_and_simpo_never_runs_the_reference(tmp_path):
    ctx = tiny_ctx()
    first = dpo.IPOTrainer(ctx, dpo.IPOConfig(num_pairs=8, batch_size=8, tau=0.5)).step(0, 1)
    assert first["loss/policy"] == pytest.approx(1.0, abs=1e-5)  # policy = reference: h = 0, (0 − 1)²
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        '{"prompt": "ab", "chosen": "e", "rejected": "xyz"}\n{"prompt": "cd", "chosen": "ee", "rejected": ""}\n'
    )
    ctx = tiny_ctx()
    ctx.ref = NoForward()
    trainer = dpo.SimPOTrainer(ctx, dpo.SimPOConfig(preference_file=str(path), batch_size=2, beta=2.0))
    ids, attn, mask = dpo.pack_completions(trainer.chosen + trainer.rejected, trainer.pad)
    with torch.no_grad():
        logp = dpo.sequence_logprobs(ctx.policy, ids, attn, mask)
    want = 2.0 * logp / mask.sum(1)  # β log π / |y|, with |y| = (2, 3 | 4, 1) tokens including EOS
    assert mask.sum(1).tolist() == [2.0, 3.0, 4.0, 1.0]
    record = trainer.step(0, 1)
    assert record["dpo/simpo_chosen_reward"] == pytest.approx(want[:2].mean().item(), abs=1e-5)
    assert record["dpo/simpo_rejected_reward"] == pytest.approx(want[2:].mean().item(), abs=1e-5)
    assert "dpo/chosen_reward" not in record


def test_kto_unpairs_and_mismatches_the_examples():
    ctx = tiny_ctx()
    trainer = kto.Trainer(ctx, kto.Config(num_pairs=6, batch_size=12, lr=3e-4, undesirable_weight=1.0))
    assert trainer.desirable.tolist() == [True] * 6 + [False] * 6
    # every example's mismatched row keeps its own prompt with another example's completion
    for (x, _), (ids, plen) in zip(trainer.examples, trainer.mismatched):
        assert ids[:plen] == ctx.tokenizer(x)["input_ids"]
    assert trainer.mismatched != trainer.encoded
    first = trainer.step(0, 1)
    # policy = reference: r = 0 and z₀ = 0, so every example's loss is λ(1 − σ(0)) = 0.5
    assert first["loss/policy"] == pytest.approx(0.5, abs=1e-5) and first["dpo/kto_reference_point"] == 0.0
    later = [trainer.step(s, s + 1) for s in range(1, 20)][-1]
    assert later["dpo/kto_desirable_reward"] > 0 > later["dpo/kto_undesirable_reward"]


def test_online_dpo_trains_on_fresh_pairs_and_skips_a_step_of_ties():
    ctx = tiny_ctx(reward=lambda prompts, completions: [float(sum(map(ord, c))) for c in completions])
    trainer = online_dpo.Trainer(ctx, online_dpo.Config(num_prompts=8))
    first = trainer.step(0, 1)  # two different samples score differently under this reward
    assert 0 < first["dpo/online_pair_fraction"] <= 1
    # policy = reference: every implicit reward ≈ 0 (the env's cached ref log-probs), loss log 2
    assert first["loss/policy"] == pytest.approx(math.log(2), abs=1e-3) and abs(first["dpo/reward_margin"]) < 1e-3
    ctx = tiny_ctx(reward=lambda prompts, completions: [0.0] * len(completions))
    trainer = online_dpo.Trainer(ctx, online_dpo.Config(num_prompts=4))
    before = [p.clone() for p in ctx.policy.parameters()]
    record = trainer.step(0, 1)
    assert record["dpo/online_pair_fraction"] == 0.0 and "loss/policy" not in record
    assert all(torch.equal(p, q) for p, q in zip(before, ctx.policy.parameters()))


# -- learning ----------------------------------------------------------------------------------------


def gold_gain(spec, tmp_path, steps, config, seed) -> tuple[float, list[float]]:
    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    task = dataclasses.replace(task, eval_prompts=task.train_prompts * 4)  # evaluate what it trained on
    ref, tok = load_base_model(task, device="cpu", progress=False)
    base = evaluate_policy(TrainContext(task, ref, ref, tok, CPU), n=320)["reward/gold"]
    kw = dict(eval_every=steps, eval_prompts=320, progress=False, device="cpu", seed=seed, config=config)
    records = train(spec, task, tmp_path / "run", steps=steps, **kw)
    assert all(math.isfinite(r.get("loss/policy", 0.0)) for r in records)
    return base, [r["reward/gold"] for r in records if "reward/gold" in r]


def test_ipo_learns_one_digit_addition(tmp_path, learning):
    """Default config, 300 steps: gold on the training prompts (320 samples) rises from the
    base model's 0.39 to 0.48-0.50 (gain 0.094-0.106 over seeds 0-2); the KL to the reference
    stays about 0.1 nats, as IPO's bounded margin promises. The margin asked for is half the
    smallest gain."""
    base, gold = gold_gain(IPO, tmp_path, 300, {}, learning.seed)
    learning.check(gold[-1], base + 0.04)  # half the smallest gain over seeds and kernels (0.084)


def test_simpo_learns_one_digit_addition(tmp_path, learning):
    """Default config (sft_weight 1), 200 steps: gold on the training prompts (320 samples) rises
    from the base model's 0.39 to 0.42-0.49 (gain 0.028-0.103 over seeds 0-2, KL 0.1-0.4 nats;
    after 300 steps 0.044-0.141); plain SimPO (sft_weight 0) falls to 0.15-0.33 in 300 steps.
    The margin asked for is half the smallest gain."""
    base, gold = gold_gain(SIMPO, tmp_path, 300, {}, learning.seed)
    learning.check(gold[-1], base + 0.02)  # half the smallest gain over seeds and kernels (0.044)


def test_kto_learns_one_digit_addition(tmp_path, learning):
    """Default config (lr 1e-4, λ_U 0.75), 200 steps: gold on the training prompts (320 samples)
    rises from the base model's 0.39 to 0.48 (gain 0.088-0.094 over seeds 0-2, KL 0.23-0.24
    nats; after 300 steps 0.072-0.137); the former lr 3e-5 gained 0.025-0.041 in 300 steps. The
    margin asked for is under half the smallest gain."""
    base, gold = gold_gain(KTO, tmp_path, 200, {}, learning.seed)
    learning.check(gold[-1], base + 0.04)


def test_online_dpo_learns_one_digit_addition(tmp_path, learning):
    """Default config (32 prompts × 2 samples per step), 100 steps: gold on the training prompts
    (320 samples) rises from the base model's 0.39 to 0.45-0.48 (gain 0.059-0.094 over seeds
    0-2, KL 0.1-0.2 nats). The margin asked for is half the smallest gain."""
    base, gold = gold_gain(ONLINE_DPO, tmp_path, 100, {}, learning.seed)
    learning.check(gold[-1], base + 0.03)
