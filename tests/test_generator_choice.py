"""``rlhf train --generator`` and a suite's ``generator``: chosen by name, saved, kept on resume, used by every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


def reinforce(out, model, *extra, steps=2):
    """``rlhf train`` of REINFORCE on arithmetic, 4 rollouts a step, evaluated at the end."""
    argv = ["train", "--algo", "reinforce", "--task", "arithmetic", "--model", str(model), "--out", str(out)]
    return [*argv, "--steps", str(steps), "--eval-every", str(steps), "--set", "num_envs=4", *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def error_lines(capsys, command="train") -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"rlhf {command}: ")]


def test_an_unknown_generator_is_one_line_listing_the_registered_ones(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(reinforce(out, model_dir, "--generator", "vllm")) == 1
    assert error_lines(capsys) == [
        "rlhf train: error: unknown generator 'vllm'; registered: hf_generate, kv_cache, kv_cache_graph"
    ]
    assert not (out / "config.json").exists()  # refused before any work


def test_the_default_generator_is_saved_and_its_rollouts_need_no_correction(tmp_path, model_dir):
    out = tmp_path / "run"
    assert cli.main(reinforce(out, model_dir)) == 0
    assert saved(out)["generator"] == "kv_cache"
    assert all("rollout/logprob_diff" not in r for r in rows(out))


def test_an_inexact_generator_logs_its_logprob_diff_and_resume_keeps_it(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(reinforce(out, model_dir, "--generator", "hf_generate")) == 0
    assert saved(out)["generator"] == "hf_generate"
    diffs = [r["rollout/logprob_diff"] for r in rows(out)]
    # generate's left-padded, cached forwards round differently from the training forward, by a little
    assert len(diffs) == 2 and all(0 < d < 1e-3 for d in diffs), diffs
    capsys.readouterr()

    assert cli.main(reinforce(out, model_dir, "--generator", "kv_cache", "--resume", steps=4)) == 1
    assert error_lines(capsys) == [
        f"rlhf train: error: {out} holds a run with other settings: generator 'hf_generate' -> 'kv_cache'; a "
        "resumed run keeps its settings: drop those flags, override them (--override; recorded in config.json), "
        "or use another output folder"
    ]
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0  # the saved generator
    assert [("rollout/logprob_diff" in r) for r in rows(out)] == [True, True, True]

    assert cli.main(reinforce(out, model_dir, "--generator", "kv_cache", "--resume", "--override", steps=4)) == 0
    run = saved(out)
    assert run["generator"] == "kv_cache"
    assert run["overrides"] == [{"at_step": 3, "changes": {"generator": {"old": "hf_generate", "new": "kv_cache"}}}]
    assert [("rollout/logprob_diff" in r) for r in rows(out)] == [True, True, True, False]


def test_a_run_saved_before_the_generator_key_resumes_as_kv_cache(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(reinforce(out, model_dir)) == 0
    run = saved(out)
    del run["generator"]
    (out / "config.json").write_text(json.dumps(run))
    assert cli.main(reinforce(out, model_dir, "--generator", "hf_generate", "--resume", steps=3)) == 1
    assert "generator 'kv_cache' -> 'hf_generate'" in error_lines(capsys)[0]
    assert cli.main(reinforce(out, model_dir, "--resume", steps=3)) == 0
    assert saved(out)["generator"] == "kv_cache"


@pytest.mark.parametrize("generator, sampler", [("kv_cache", "RowSeededSampler"), ("hf_generate", "HFGenerateSampler")])
def test_data_parallel_ranks_sample_with_the_runs_generator(tmp_path, model_dir, monkeypatch, generator, sampler):
    from rlhf_env.algorithms.scale import distributed

    built = []
    real = distributed.rank_sampler

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(distributed, "rank_sampler", spy)
    out = tmp_path / "run"
    argv = reinforce(out, model_dir, "--backend", "gloo", "--eval-every", "100")  # a 1-rank data-parallel run
    argv += [] if generator == "kv_cache" else ["--generator", generator]
    assert cli.main(argv) == 0
    assert [type(s).__name__ for s in built] == [sampler, sampler]  # one rollout a step
    has_diff = ["rollout/logprob_diff" in r for r in rows(out)]
    assert has_diff == [generator == "hf_generate"] * 2


SUITE = """seeds = [0]
algorithms = ["reinforce"]
eval_points = 1
eval_prompts = 4
workers = 0
{generator}
[budget]
tokens = 8
[hparams.reinforce]
num_envs = 4
[[tasks]]
name = "arithmetic"
knobs = {{ digits = 1, n_train = 40, n_eval = 10, sft_steps = 20 }}
"""


def bench(suite: Path, out: Path) -> int:
    return cli.main(["bench", "--no-progress", "--suite", str(suite), "--out", str(out)])


def test_a_suites_generator_reaches_its_cells_and_a_changed_one_is_not_reused(tmp_path, capsys):
    suite, out = tmp_path / "s.toml", tmp_path / "out"
    suite.write_text(SUITE.format(generator='generator = "hf_generate"'))
    assert bench(suite, out) == 0, capsys.readouterr().err
    cell = out / "runs" / "arithmetic" / "reinforce" / "seed0"
    assert saved(cell)["generator"] == "hf_generate"
    assert json.loads((cell / "settings.json").read_text())["generator"] == "hf_generate"
    assert all("rollout/logprob_diff" in r for r in rows(cell))
    capsys.readouterr()

    suite.write_text(SUITE.format(generator=""))  # back to the default generator
    assert bench(suite, out) == 1
    assert error_lines(capsys, "bench") == [
        f"rlhf bench: error: {out}: 1 result(s) were made with other settings than the suite's: "
        "arithmetic/reinforce/seed0 (generator 'hf_generate' -> None); remove their folders to run them again "
        "with the new settings, or use another --out"
    ]


def test_a_suite_naming_an_unknown_generator_is_refused_naming_the_file(tmp_path, capsys):
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE.format(generator='generator = "fast"'))
    assert bench(suite, tmp_path / "out") == 1
    assert error_lines(capsys, "bench") == [
        f"rlhf bench: error: {suite}: generator: unknown generator 'fast'; registered: "
        "hf_generate, kv_cache, kv_cache_graph"
    ]
    assert not (tmp_path / "out").exists()
