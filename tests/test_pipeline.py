"""The RLHF pipeline in `rlhf bench`: preferences -> one shared reward model -> policies, gold measured."""

from __future__ import annotations

import csv
import json
import re

import pytest

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench import pipeline
from rlhf_env.bench.report import write_report
from rlhf_env.bench.runner import cell_dir, run_suite
from rlhf_env.bench.suite import SuiteError, load_suite

TASK = 'name = "arithmetic"\nknobs = { digits = 1, n_train = 80, n_eval = 20, sft_steps = 100 }\n'


def test_one_reward_model_per_task_and_seed_shared_by_every_cell(tmp_path):
    body = (
        'seeds = [0]\nalgorithms = ["reinforce", "dpo"]\neval_points = 1\neval_prompts = 8\nthreads = 1\n'
        "[budget]\ntokens = 40\n[hparams.reinforce]\nnum_envs = 8\n[hparams.dpo]\nbatch_size = 8\n"
        f'[[tasks]]\n{TASK}reward = "learned"\n'
        "pipeline = { pairs = 16, rm_steps = 3, heldout_pairs = 16, beta = 0.1, best_of_n = 4, best_of_n_prompts = 4 }\n"
    )
    (tmp_path / "s.toml").write_text(body)
    suite = load_suite(tmp_path / "s.toml")
    out = tmp_path / "out"
    results = run_suite(suite, out, workers=0, progress=False)
    assert [r["status"] for r in results] == ["ok"] * 2, [r.get("error") for r in results]

    # One reward model, trained on the 16 pairs, its held-out accuracy measured.
    (rm_folder,) = (out / "reward_models").iterdir()
    rm = rm_folder / "seed0"
    assert rm_folder.name == "arithmetic-N16-tau0.25" and (rm / "model" / "config.json").exists()
    assert len((rm / "pairs.jsonl").read_text().splitlines()) == 16
    rm_result = json.loads((rm / "result.json").read_text())
    assert 0 <= rm_result[M.RM_HELDOUT_ACCURACY] <= 1 and rm_result["pairs"] == 16
    # Every cell points at it: the online one optimises it, the offline one learns from its pairs.
    for c in suite.cells():
        config = json.loads((cell_dir(out, c) / "config.json").read_text())
        assert config["reward"] == str(rm / "model")
        if c.algorithm == "dpo":
            assert config["config"]["preference_file"] == str(rm / "pairs.jsonl") and config["config"]["beta"] == 0.1
        else:
            assert config["config"]["kl_coef"] == 0.1  # the suite's β
    online = next(r for r in results if r["algorithm"] == "reinforce")
    assert M.REWARD_PROXY in online and M.REWARD_GOLD in online  # proxy and gold, measured apart
    bon = json.loads((pipeline.bon_dir(out, suite.tasks[0], 0) / "result.json").read_text())
    assert [c["n"] for c in bon["curve"]] == [1, 2, 4] and bon[M.OBJECTIVE_KL_BEST_OF_N] == pytest.approx(
        0.636294, 1e-5
    )

    # A second run trains nothing again.
    stamp = (rm / "result.json").stat().st_mtime_ns
    run_suite(suite, out, workers=0, progress=False)
    assert (rm / "result.json").stat().st_mtime_ns == stamp

    paths = write_report(suite, out)
    md = paths["markdown"].read_text()
    assert "*Learned reward (RLHF)*: 16 base-model pairs" in md
    assert f"Reward model held-out pair accuracy: {rm_result[M.RM_HELDOUT_ACCURACY]:.3f} against" in md
    assert "| best-of-4 *(baseline)* | 1 |" in md
    row = next(r for r in csv.DictReader(paths["csv"].open()) if r["algorithm"] == "reinforce")
    assert float(row[M.REWARD_PROXY]) == pytest.approx(online[M.REWARD_PROXY])
    assert paths["overoptimisation"].read_bytes()[:4] == b"\x89PNG"


def test_sweeps_expand_into_labelled_entries_that_share_a_reward_model_per_n_and_tau(tmp_path):
    pipe = "pipeline = { pairs = [16, 32], beta = [0.05, 0.1], best_of_n = 2 }"
    (tmp_path / "s.toml").write_text(
        f'seeds = [0, 1]\n[budget]\ntokens = 10\n[[tasks]]\n{TASK}reward = "learned"\n{pipe}\n'
    )
    suite = load_suite(tmp_path / "s.toml")
    labels = ["arithmetic-N16-beta0.05", "arithmetic-N16-beta0.1", "arithmetic-N32-beta0.05", "arithmetic-N32-beta0.1"]
    assert [t.label for t in suite.tasks] == labels
    assert suite.tasks[1].hparams["ppo"]["kl_coef"] == 0.1 and suite.tasks[1].hparams["dpo"]["beta"] == 0.1
    assert "beta" not in suite.tasks[1].hparams.get("simpo", {})  # reference-free: its β is no KL coefficient
    rm_jobs, bon_jobs = pipeline.feedback_jobs(suite, tmp_path / "out")
    # Two budgets × two seeds reward models, each shared by its two β entries; best-of-n per entry and seed.
    assert [k for k, _, _ in rm_jobs] == [
        f"arithmetic-N{n}-tau0.25/reward_model/seed{s}" for n in (16, 32) for s in (0, 1)
    ]
    assert len(bon_jobs) == 8


@pytest.mark.parametrize(
    "pipeline_table, message",
    [
        ("{ pairs = 0 }", "pipeline.pairs must be an integer > 0 (or a list of them), got 0"),
        ("{ best_of_n = 48 }", "pipeline.best_of_n must be a power of two or 0, got 48"),
        ("{ depth = 3 }", "unknown pipeline keys ['depth']"),
        ("{ tau = [] }", "pipeline.tau is an empty list"),
    ],
)
def test_bad_pipeline_tables_name_the_key(tmp_path, pipeline_table, message):
    (tmp_path / "s.toml").write_text(
        f"seeds = [0]\n[budget]\ntokens = 10\n[[tasks]]\n{TASK}pipeline = {pipeline_table}\n"
    )
    with pytest.raises(SuiteError, match=re.escape("s.toml: tasks[0]: " + message)):
        load_suite(tmp_path / "s.toml")


def test_a_reward_that_cannot_be_used_fails_the_suite_before_any_work(tmp_path):
    (tmp_path / "s.toml").write_text(f'seeds = [0]\n[budget]\ntokens = 10\n[[tasks]]\n{TASK}reward = "nonesuch"\n')
    with pytest.raises(SuiteError, match="task arithmetic: reward 'nonesuch': unknown reward 'nonesuch'"):
        run_suite(load_suite(tmp_path / "s.toml"), tmp_path / "out", workers=0, progress=False)
    assert not (tmp_path / "out").exists()
