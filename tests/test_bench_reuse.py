"""``rlhf bench`` reruns reuse a result only when the suite still resolves to the settings it was made with."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinyparts import TOY_ALGO_SOURCE

from rlhf_env.plugins import cli

TASK = '[[tasks]]\nname = "arithmetic"\nknobs = { digits = 1, n_train = 80, n_eval = 20, sft_steps = 100 }\n'
HEAD = 'seeds = [0]\nalgorithms = ["toy"]\neval_points = 1\neval_prompts = 8\nworkers = 0\n[budget]\ntokens = 40\n'


@pytest.fixture
def toy_plugin(plugin_path, write_dist):
    write_dist(plugin_path, "rlhf_demo_reuse", {"reuse_toys": "rlhf_demo_reuse"}, {"rlhf_demo_reuse": TOY_ALGO_SOURCE})
    return plugin_path


def bench(suite: Path, out: Path) -> int:
    return cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf bench: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_edited_hparam_is_not_reported_over_the_old_cells(toy_plugin, tmp_path, capsys):
    suite, out = tmp_path / "s.toml", tmp_path / "out"
    suite.write_text(f"{HEAD}[hparams.toy]\nlr = 0.01\n{TASK}")
    assert bench(suite, out) == 0
    report = (out / "results.md").read_text()
    suite.write_text(f"{HEAD}[hparams.toy]\nlr = 0.05\n{TASK}")
    assert bench(suite, out) == 1
    assert error_line(capsys) == (
        f"rlhf bench: error: {out}: 1 result(s) were made with other settings than the suite's: "
        "arithmetic/toy/seed0 (hparams.lr 0.01 -> 0.05); remove their folders to run them again with the new "
        "settings, or use another --out"
    )
    assert (out / "results.md").read_text() == report  # the old table is not relabelled
    suite.write_text(f"{HEAD}[hparams.toy]\nlr = 0.01\n{TASK}")  # the same settings again: reused
    assert bench(suite, out) == 0
    assert "1 of 1 cells already finished" in capsys.readouterr().out


def test_a_reward_model_trained_with_other_pipeline_settings_is_not_reused(toy_plugin, tmp_path, capsys):
    suite, out = tmp_path / "s.toml", tmp_path / "out"
    pipeline = 'reward = "learned"\npipeline = {{ pairs = 16, rm_steps = {}, heldout_pairs = 16 }}\n'
    suite.write_text(f"{HEAD}{TASK}{pipeline.format(2)}")
    assert bench(suite, out) == 0
    suite.write_text(f"{HEAD}{TASK}{pipeline.format(3)}")
    assert bench(suite, out) == 1
    line = error_line(capsys)
    assert line.startswith(f"rlhf bench: error: {out}: 2 result(s) were made with other settings than the suite's: ")
    assert "arithmetic-N16-tau0.25/reward_model/seed0 (pipeline.rm_steps 2 -> 3)" in line
    assert "arithmetic/toy/seed0 (reward_model.pipeline.rm_steps 2 -> 3)" in line


def test_a_feedback_sweep_on_a_gold_task_is_refused(toy_plugin, tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(f"{HEAD}{TASK}pipeline = {{ pairs = [16, 32] }}\n")
    assert bench(suite, tmp_path / "out") == 1
    assert error_line(capsys) == (
        f"rlhf bench: error: {suite}: tasks[0]: pipeline.pairs sweeps [16, 32] but the task's reward is 'gold': "
        'pairs only shape a learned reward, so every entry would run the same cells; give one value, or set reward = "learned"'
    )
    assert not (tmp_path / "out").exists()
