"""The shared training loop and ``rlhf train``: resume, NaN guard, plugins, bad input, REINFORCE learning."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tinyparts import TOY_ALGO_SOURCE

from rlhf_env import plugins
from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env.algorithms.run.loop import TrainingError, train
from rlhf_env.algorithms.run.plumbing import check_finite
from rlhf_env.algorithms.zoo import reinforce
from rlhf_env.plugins import cli
from rlhf_env.tasks.arithmetic import make_arithmetic_task

VOLATILE = ("perf/tokens_per_s", "perf/step_time_s", "time/elapsed_s")
SPEC = AlgorithmSpec(reinforce.Config, reinforce.Trainer)


@pytest.fixture
def task():
    """A tiny task whose base model (built once per session, in the test cache) is weak."""
    return make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)


def stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def test_resumed_run_reproduces_an_uninterrupted_one(task, tmp_path):
    kw = dict(eval_every=3, eval_prompts=16, checkpoint_every=3, progress=False, device="cpu", config={"num_envs": 8})
    whole = train(SPEC, task, tmp_path / "whole", steps=6, **kw)
    train(SPEC, task, tmp_path / "split", steps=3, **kw)
    resumed = train(SPEC, task, tmp_path / "split", steps=6, resume=True, **kw)
    assert stable(resumed) == stable(whole) and len(whole) == 6
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(6))
    assert (tmp_path / "split" / "tb").is_dir() and (tmp_path / "split" / "checkpoint" / "model.safetensors").exists()


class NaNAtStep2(reinforce.Trainer):
    def step(self, step, seed):
        if step == 2:
            check_finite(policy=torch.tensor(float("nan")))
        return super().step(step, seed)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(task, tmp_path):
    spec = AlgorithmSpec(reinforce.Config, NaNAtStep2)
    with pytest.raises(TrainingError, match=r"step 2: non-finite loss.*last good checkpoint is kept"):
        train(
            spec,
            task,
            tmp_path / "run",
            steps=5,
            checkpoint_every=1,
            eval_every=0,
            progress=False,
            device="cpu",
            config={"num_envs": 4},
        )
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2  # steps 0 and 1 finished and were saved; nothing of step 2
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "overrides, message", [({"lr": -1.0}, "invalid REINFORCE"), ({"bogus": 1}, "unknown config keys")]
)
def test_impossible_config_errors_before_any_work(task, tmp_path, monkeypatch, overrides, message):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=message):
        train(SPEC, task, tmp_path / "run", steps=3, config=overrides, progress=False, device="cpu")
    assert not (tmp_path / "cache").exists()  # no base model was built


def test_cli_names_the_known_algorithms_and_tasks(tmp_path, capsys):
    assert cli.main(["train", "--algo", "nope", "--task", "arithmetic", "--out", str(tmp_path)]) == 1
    assert "unknown algorithm 'nope'; registered: " in capsys.readouterr().err
    assert cli.main(["train", "--algo", "reinforce", "--task", "nope", "--out", str(tmp_path)]) == 1
    assert (
        "unknown task 'nope'; registered: arithmetic, arithmetic_chat, calculator, guess_number, prompt_file, reasoning_gym, sentiment"
        in capsys.readouterr().err
    )


def test_an_algorithm_from_a_plugin_trains_through_rlhf_train(plugin_path, write_dist, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    write_dist(plugin_path, "rlhf_demo_toy", {"toy": "rlhf_demo_toy"}, {"rlhf_demo_toy": TOY_ALGO_SOURCE})
    assert plugins.get_host().algorithms.entry("toy_sft").plugin == "toy"
    checkpoint = tmp_path / "ckpt"
    from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    save_tiny(*build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0), checkpoint)
    out = tmp_path / "run"
    argv = [
        "train",
        "--algo",
        "toy_sft",
        "--task",
        "arithmetic",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--steps",
        "3",
        "--eval-every",
        "3",
        "--set",
        "lr=0.01",
    ]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and records[2]["loss/policy"] < records[0]["loss/policy"]
    assert "reward/gold" in records[-1] and "toy_sft on arithmetic" in capsys.readouterr().out


def test_reinforce_raises_the_gold_reward(task, tmp_path, learning):
    """128 episodes a step (64, the default, is too noisy a gradient to rise reliably in 120
    steps: 0.08-0.29 over seeds), 120 steps, gold on the training prompts (320 samples, ±0.03;
    1-digit sums are too few for unseen ones to be a steady signal). Measured over seeds 0-2:
    0.39 -> 0.68-0.74 (KL 0.6-0.7). The margin asked for is 0.15."""
    task = dataclasses.replace(task, eval_prompts=task.train_prompts * 4)
    records = train(
        SPEC,
        task,
        tmp_path / "run",
        steps=120,
        eval_every=60,
        eval_prompts=320,
        progress=False,
        device="cpu",
        config={"num_envs": 128},
        seed=learning.seed,
    )
    golds = [r["reward/gold"] for r in records if "reward/gold" in r]
    base = base_gold(task, tmp_path)
    learning.check(golds[-1], base + 0.15)


def base_gold(task, tmp_path):
    """reward/gold of the untrained base model, measured the way the loop measures it."""
    records = train(
        SPEC,
        task,
        tmp_path / "base",
        steps=1,
        eval_every=1,
        eval_prompts=320,
        progress=False,
        device="cpu",
        config={"lr": 1e-12},
    )
    return records[-1]["reward/gold"]


# -- the loop's stages, each on its own -----------------------------------------------------------


def test_schedule_evaluates_at_equal_fractions_of_the_budget_and_at_the_end():
    from rlhf_env.algorithms.run.schedule import Budget, Schedule

    points = Schedule(Budget(tokens=100), eval_points=4, checkpoint_every=3)
    assert [points.evaluates(s, b, d) for s, (b, d) in enumerate([(0, 0.2), (0.2, 0.3), (0.3, 0.55), (0.55, 1.0)])] == [
        False,
        True,
        True,
        True,
    ]
    every = Schedule(Budget(steps=5), eval_every=2)
    assert [every.evaluates(s, s / 5, (s + 1) / 5) for s in range(5)] == [False, True, False, True, True]
    assert [points.checkpoints(n, 0.5) for n in (1, 3, 6)] == [False, True, True] and points.checkpoints(1, 1.0)
    assert not Schedule(Budget(steps=5), eval_every=0).evaluates(1, 0.2, 0.4)


def test_read_folder_refuses_a_folder_that_holds_a_run_unless_resumed(tmp_path):
    from rlhf_env.algorithms.run.runfolder import RunFolderError
    from rlhf_env.algorithms.run.stages import read_folder

    assert read_folder(tmp_path, False, 10, True).resuming is False  # empty: a new run
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(RunFolderError, match="already holds a run"):
        read_folder(tmp_path, False, 10, True)
    assert read_folder(tmp_path, True, 10, True).history == [{"step": 0}]  # before the first checkpoint: starts again


def test_sinks_write_each_record_to_jsonl_and_the_callback(tmp_path):
    from rlhf_env.algorithms.run.loop import Sinks
    from rlhf_env.algorithms.run.stages import Folder

    seen = []
    sinks = Sinks(Folder(tmp_path, [], False), True, 0, 0.0, "t", False, lambda r, f: seen.append((r["step"], f)))
    sinks.write({"step": 0, "reward/score": 0.5}, 0.5)
    sinks.write({"step": 1, "reward/score": float("nan")}, 1.2)  # a NaN goes to jsonl, not TensorBoard
    sinks.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert seen == [(0, 0.5), (1, 1.0)] and (tmp_path / "tb").is_dir()
