"""SFT and the Bradley-Terry reward model: losses by hand, config, export as an env reward, learning."""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import pytest
import torch
from tinyparts import count_e, tiny_pair

from rlhf_env import RewardModel
from rlhf_env.algorithms.base import AlgorithmSpec, TrainContext
from rlhf_env.algorithms.run.loop import evaluate_policy, train
from rlhf_env.algorithms.zoo import reward_model, sft
from rlhf_env.models import load_causal_lm
from rlhf_env.scoring import pad_batch, sft_loss
from rlhf_env.seeding import derive
from rlhf_env.tasks.arithmetic import make_arithmetic_task
from rlhf_env.tasks.base import Task
from rlhf_env.tasks.base_models import load_base_model
from rlhf_env.tiny import save_tiny

SFT = AlgorithmSpec(sft.Config, sft.Trainer)
RM = AlgorithmSpec(reward_model.Config, reward_model.Trainer)
CPU = torch.device("cpu")


def tiny_task() -> Task:
    return Task("tiny", ["ab", "cd", "ef", "gh"], ["ij", "kl"], count_e, [("ab", "e"), ("cd", "ee")], max_new_tokens=4)


def tiny_ctx():
    _, ref, tok = tiny_pair()
    return TrainContext(tiny_task(), copy.deepcopy(ref).eval(), ref, tok, CPU, seed=0)


# -- maths and config ------------------------------------------------------------------------------


def test_bt_loss_by_hand():
    r_chosen = torch.tensor([2.0, 0.0, -1.0])
    r_rejected = torch.tensor([1.0, 0.0, 1.0])
    want = (math.log1p(math.exp(-1.0)) + math.log(2) + math.log1p(math.exp(2.0))) / 3
    assert reward_model.bt_loss(r_chosen, r_rejected).item() == pytest.approx(want, abs=1e-6)
    # Only differences matter, and a huge margin stays finite.
    assert reward_model.bt_loss(r_chosen + 7, r_rejected + 7).item() == pytest.approx(want, abs=1e-5)
    assert reward_model.bt_loss(torch.tensor([-1e4]), torch.tensor([0.0])).item() == pytest.approx(1e4)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (SFT, {"lr": 0.0}, "invalid SFT config"),
        (SFT, {"batch_size": 0}, "invalid SFT config"),
        (SFT, {"max_grad_norm": 0.0}, "invalid SFT config"),
        (RM, {"lr": -1.0}, "lr and max_grad_norm"),
        (RM, {"batch_size": 0}, "must be >= 1"),
        (RM, {"num_heldout_pairs": 0}, "must be >= 1"),
        (RM, {"heldout_every": -1}, "heldout_every"),
        (RM, {"annotator_tau": 0.0}, "annotator_tau"),
        (RM, {"bogus": 1}, "unknown config keys"),
    ],
)
def test_impossible_config_is_an_error(spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        spec.make_config(**overrides)


# -- SFT -----------------------------------------------------------------------------------------------


def test_sft_step_is_the_base_model_loss_and_leaves_nothing_else():
    ctx = tiny_ctx()
    trainer = sft.Trainer(ctx, sft.Config(batch_size=3))
    before = copy.deepcopy(ctx.policy)
    metrics = trainer.step(0, 9)
    gen = torch.Generator().manual_seed(derive(9, "rows"))  # the step seed's row stream
    idx = torch.randint(len(ctx.task.sft_data), (3,), generator=gen).tolist()
    with torch.no_grad():
        want = sft_loss(before, ctx.tokenizer, [ctx.task.sft_data[i] for i in idx]).item()
    assert metrics["loss/sft"] == pytest.approx(want, abs=1e-5)
    assert metrics["perf/tokens"] == sum(len(ctx.task.sft_data[i][1]) + 1 for i in idx)
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), ctx.policy.parameters()))


@pytest.fixture
def arithmetic():
    """1-digit addition; its base model is built once per session in the test cache (conftest)."""
    return make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)


def test_sft_lowers_the_loss_and_raises_gold(arithmetic, tmp_path, learning):
    """Default config, seed 0, 200 steps: SFT loss on all demonstrations 0.41 -> 0.025, gold on the
    training prompts (320 samples) 0.39 -> 0.87-0.95 over seeds 0-1 and two CPU kernels."""
    task = dataclasses.replace(arithmetic, eval_prompts=arithmetic.train_prompts * 4)
    ref, tok = load_base_model(task, device="cpu", progress=False)
    base = evaluate_policy(TrainContext(task, ref, ref, tok, CPU), n=320)
    records = train(
        SFT,
        task,
        tmp_path / "run",
        steps=200,
        eval_every=100,
        eval_prompts=320,
        progress=False,
        device="cpu",
        seed=learning.seed,
    )
    policy = load_causal_lm(tmp_path / "run" / "checkpoint", device="cpu")
    with torch.no_grad():
        loss_before, loss_after = sft_loss(ref, tok, task.sft_data).item(), sft_loss(policy, tok, task.sft_data).item()
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    learning.check(records[-1]["reward/gold"], base["reward/gold"] + 0.2)
    assert all(math.isfinite(r["loss/sft"]) for r in records)


VOLATILE = ("perf/tokens_per_s", "perf/step_time_s", "time/elapsed_s")


@pytest.mark.parametrize(
    "spec, config",
    [(SFT, {"batch_size": 4}), (RM, {"num_pairs": 16, "num_heldout_pairs": 8, "batch_size": 4, "heldout_every": 2})],
    ids=["sft", "reward_model"],
)
def test_a_resumed_run_reproduces_an_uninterrupted_one(tmp_path, spec, config):
    _, ref, tok = tiny_pair()
    save_tiny(ref, tok, tmp_path / "base")
    kw = dict(
        model_path=str(tmp_path / "base"),
        eval_every=2,
        eval_prompts=2,
        checkpoint_every=2,
        progress=False,
        device="cpu",
        config=config,
    )
    whole = train(spec, tiny_task(), tmp_path / "whole", steps=4, **kw)
    train(spec, tiny_task(), tmp_path / "split", steps=2, **kw)
    resumed = train(spec, tiny_task(), tmp_path / "split", steps=4, resume=True, **kw)
    strip = [{k: v for k, v in r.items() if k not in VOLATILE} for r in whole]
    assert [{k: v for k, v in r.items() if k not in VOLATILE} for r in resumed] == strip and len(whole) == 4


# -- reward model ------------------------------------------------------------------------------------


def test_reward_model_leaves_the_policy_alone_and_keeps_its_weights_in_the_state():
    ctx = tiny_ctx()
    policy_before = copy.deepcopy(ctx.policy.state_dict())
    config = reward_model.Config(num_pairs=16, num_heldout_pairs=8, batch_size=8, heldout_every=2)
    trainer = reward_model.Trainer(ctx, config)
    assert all(p.prompt in ctx.task.train_prompts for p in trainer.pairs)
    assert all(p.prompt in ctx.task.eval_prompts for p in trainer.heldout)
    first = trainer.step(0, 1)
    assert first["loss/reward_model"] == pytest.approx(math.log(2))  # the head starts at zero
    assert "rm/heldout_accuracy" not in first
    second = trainer.step(1, 2)
    assert 0 <= second["rm/heldout_accuracy"] <= 1 and 0 <= second["rm/accuracy"] <= 1
    assert all(torch.equal(v, ctx.policy.state_dict()[k]) for k, v in policy_before.items())
    # A fresh trainer loaded from the state continues identically.
    other = reward_model.Trainer(ctx, config)
    other.load_state_dict(copy.deepcopy(trainer.state_dict()))
    assert trainer.step(2, 3) == other.step(2, 3)


def test_exported_reward_model_scores_like_the_trainer(tmp_path):
    ctx = tiny_ctx()
    trainer = reward_model.Trainer(ctx, reward_model.Config(num_pairs=16, num_heldout_pairs=8, batch_size=8, lr=1e-2))
    for s in range(3):
        trainer.step(s, s)
    prompts = ["ab", "cd", "abcdefgh", "x"]
    completions = ["eee", "", "e", "hello world"]  # different lengths, one empty
    mine = trainer.score(prompts, completions)
    assert mine.abs().max() > 0  # the head has moved off zero
    path = trainer.save_reward_model(tmp_path / "rm")
    rm = RewardModel(path, device="cpu")
    assert rm.model.config.num_labels == 1 and rm.model.config.pad_token_id == ctx.tokenizer.pad_token_id
    assert torch.allclose(rm(prompts, completions), mine, atol=1e-5)
    ids = reward_model.encode_scored(ctx.tokenizer, prompts, completions)
    assert torch.allclose(rm.score_ids(ids), mine, atol=1e-5)  # the env's id path


def test_a_run_checkpoint_exports_as_an_env_reward(tmp_path):
    _, ref, tok = tiny_pair()
    save_tiny(ref, tok, tmp_path / "base")
    train(
        RM,
        tiny_task(),
        tmp_path / "run",
        steps=3,
        model_path=str(tmp_path / "base"),
        eval_every=0,
        progress=False,
        device="cpu",
        config={"num_pairs": 16, "num_heldout_pairs": 8, "batch_size": 8, "lr": 1e-2},
    )
    path = reward_model.export_reward_model(tmp_path / "run" / "checkpoint", tmp_path / "rm")
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    model = reward_model.ScalarRewardModel(ref)
    model.load_state_dict(state["trainer"]["reward_model"])
    ids = reward_model.encode_scored(tok, ["ab", "ij"], ["e", "xyz"])
    with torch.no_grad():
        want = model(*pad_batch(ids, tok.pad_token_id))
    assert want.abs().max() > 0
    assert torch.allclose(RewardModel(path, device="cpu").score_ids(ids), want, atol=1e-5)


def test_reward_model_learns_arithmetic_preferences(arithmetic, tmp_path, learning):
    """Default config, seed 0, 300 steps on annotator pairs (τ = 0.25) of 1-digit addition, held out
    = fresh pairs (another seed) on the *training* prompts. About half the pairs are two wrong
    answers, labelled by a coin flip, so agreement with the annotator tops out near 0.75.
    Measured over seeds 0-1 and two CPU kernels (AVX2, non-vectorised): gold-order accuracy
    0.73-0.78, annotator agreement 0.61-0.65 (256 held-out pairs: ±0.03). Thresholds sit
    about 2.5 standard errors under the lowest of these.

    On pairs from the 20 *unseen* eval prompts it does not generalise (0.43-0.67 gold order over
    configs and seeds): judging an unseen sum means knowing arithmetic, which 80 problems do not
    teach a 2-layer model. The test below checks generalisation where it is possible."""
    task = dataclasses.replace(arithmetic, eval_prompts=arithmetic.train_prompts)
    records = train(
        RM,
        task,
        tmp_path / "run",
        steps=300,
        eval_every=0,
        progress=False,
        device="cpu",
        seed=learning.seed,
        config={"heldout_every": 100},
    )
    held = [r for r in records if "rm/heldout_accuracy" in r]
    assert [r["step"] for r in held] == [99, 199, 299]
    learning.check(held[-1]["rm/heldout_gold_accuracy"], 0.65, "rm/heldout_gold_accuracy")
    learning.check(held[-1]["rm/heldout_accuracy"], 0.55, "rm/heldout_accuracy")
    # The Bradley-Terry loss of a coin-flip pair is log 2; training brings the mean under it.
    learning.check(
        math.log(2) - sum(r["loss/reward_model"] for r in records[-20:]) / 20, 0.03, "log 2 − loss (last 20)"
    )


def letter_score(prompts, completions):
    """A lexical gold: +1 per 'e' or 'a', -1 per 'o' in the completion."""
    return [float(c.count("e") + c.count("a") - c.count("o")) for c in completions]


def test_reward_model_generalises_to_unseen_prompts(tmp_path, learning):
    """A lexical gold over samples of a tiny random model, 100 train and 20 unseen eval prompts:
    default config, seed 0, 150 steps. Measured over seeds 0-1 and two CPU kernels: 0.83-0.93 of
    the held-out pairs whose gold differs ordered as gold does, 0.57-0.63 agreement with the
    annotator's labels (chance: 0.5)."""
    rng = random.Random(0)
    prompts = ["".join(rng.choice("abcdefghijklmnop ") for _ in range(6)) for _ in range(120)]
    task = Task("letters", prompts[:100], prompts[100:], letter_score, [("a", "b")], max_new_tokens=8)
    _, ref, tok = tiny_pair()
    save_tiny(ref, tok, tmp_path / "base")
    records = train(
        RM,
        task,
        tmp_path / "run",
        steps=150,
        model_path=str(tmp_path / "base"),
        eval_every=0,
        progress=False,
        device="cpu",
        seed=learning.seed,
        config={"heldout_every": 50},
    )
    held = [r for r in records if "rm/heldout_accuracy" in r]
    assert len(held) == 3
    learning.check(held[-1]["rm/heldout_gold_accuracy"], 0.7, "rm/heldout_gold_accuracy")
    learning.check(held[-1]["rm/heldout_accuracy"], 0.5, "rm/heldout_accuracy")
