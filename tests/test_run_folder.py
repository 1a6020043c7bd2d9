"""``rlhf train --resume`` keeps a run's settings; crashes never lose a run; one process owns a run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


def sft(out, model, *extra, steps=2, batch=4, every=2):
    """``rlhf train`` of SFT on arithmetic: ``batch`` pairs a step, evaluated every ``every`` steps."""
    argv = ["train", "--algo", "sft", "--task", "arithmetic", "--model", str(model), "--out", str(out)]
    return [*argv, "--steps", str(steps), "--eval-every", str(every), "--set", f"batch_size={batch}", *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def saved(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def stderr_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("rlhf train: ")]


# -- resume keeps the run's settings -----------------------------------------------------------


def test_resume_with_another_algorithm_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir)) == 0
    before = (out / "metrics.jsonl").read_text()
    argv = ["train", "--algo", "reinforce", "--task", "arithmetic", "--model", str(model_dir), "--out", str(out)]
    assert cli.main([*argv, "--steps", "4", "--set", "num_envs=4", "--resume"]) == 1
    assert stderr_lines(capsys) == [
        f"rlhf train: error: {out} holds a run with other settings: algorithm 'sft' -> 'reinforce'; a resumed run "
        "keeps its settings: the algorithm of a run cannot change; start a new run (its checkpoint can be its --model)"
    ]
    assert (out / "metrics.jsonl").read_text() == before and saved(out)["algorithm"] == "sft"
    assert cli.main([*argv, "--steps", "4", "--resume", "--override"]) == 1  # not even on purpose


def test_resume_without_the_set_flags_keeps_the_saved_config(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir, "--set", "lr=0.002")) == 0
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "4"]) == 0  # algorithm, task, model: the run's
    assert saved(out)["config"] == {"lr": 0.002, "batch_size": 4, "max_grad_norm": 1.0}
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3]
    # 4 answers of at most 4 characters + EOS a step, not the default 32 answers (>= 64 tokens)
    assert all(r["perf/tokens"] <= 20 for r in rows(out))


def test_resume_with_a_disagreeing_flag_names_the_key_and_both_values(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir)) == 0
    assert cli.main(sft(out, model_dir, "--seed", "3", "--resume", steps=4, batch=8)) == 1
    assert stderr_lines(capsys) == [
        f"rlhf train: error: {out} holds a run with other settings: seed 0 -> 3, batch_size 4 -> 8; a resumed run "
        "keeps its settings: drop those flags, override them (--override; recorded in config.json), or use another "
        "output folder"
    ]
    assert cli.main(sft(out, model_dir, "--resume", "--override", steps=4, batch=8)) == 0
    run = saved(out)
    assert run["config"]["batch_size"] == 8
    assert run["overrides"] == [{"at_step": 2, "changes": {"batch_size": {"old": 4, "new": 8}}}]
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3]


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir)) == 0
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(sft(out, model_dir)) == 1
    assert stderr_lines(capsys) == [
        f"rlhf train: error: {out} already holds a run (2 steps in metrics.jsonl, a checkpoint); resume it, "
        "or use another output folder"
    ]
    assert (out / "metrics.jsonl").read_text() == before


# -- crashes ------------------------------------------------------------------------------------


def test_a_crash_between_the_checkpoint_renames_resumes_from_the_old_checkpoint(
    tmp_path, model_dir, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_replace = os.replace

    def power_cut(src, dst):
        if Path(src).name.startswith(".checkpoint-") and any(out.glob(".old-*")):
            raise OSError("power cut")  # after the old checkpoint moved aside, before the new one moved in
        real_replace(src, dst)

    assert cli.main(sft(out, model_dir)) == 0
    first = rows(out)
    monkeypatch.setattr(os, "replace", power_cut)
    assert cli.main(sft(out, model_dir, "--resume", steps=4)) == 1
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "checkpoint").exists() and len(list(out.glob(".old-*"))) == 1  # the moment the issue names
    assert cli.main(sft(out, model_dir, "--resume", steps=4)) == 0
    lines = stderr_lines(capsys)
    assert any(
        "the last checkpoint write was interrupted; restored the previous one from .old-" in line for line in lines
    )
    assert rows(out)[:2] == first  # history kept, not redone
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3]
    assert not list(out.glob(".old-*")) and not list(out.glob(".checkpoint-*"))


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir)) == 0
    first = rows(out)
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 2, "loss/sft": 1.2')  # the power went while a continued run wrote step 2's line
    assert cli.main(sft(out, model_dir, "--resume", steps=4)) == 0
    assert stderr_lines(capsys) == [
        f"rlhf train: warning: {metrics}: line 3 is incomplete (the run stopped while writing it); dropped it"
    ]
    assert rows(out)[:2] == first and [r["step"] for r in rows(out)] == [0, 1, 2, 3]


def test_a_damaged_metrics_line_before_the_end_is_an_error_naming_the_file(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir)) == 0
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{oops", *lines[1:]]) + "\n")
    assert cli.main(sft(out, model_dir, "--resume", steps=4)) == 1
    line = stderr_lines(capsys)[0]
    assert line.startswith(f"rlhf train: error: {metrics}: line 1 is not a metrics record (")
    assert line.endswith("; the file is damaged")
    assert metrics.read_text().startswith("{oops")  # left as it was


def test_a_lost_checkpoint_is_not_papered_over_by_starting_again(tmp_path, model_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(sft(out, model_dir, steps=12, every=12)) == 0  # checkpoints after steps 10 and 12
    shutil.rmtree(out / "checkpoint")
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(sft(out, model_dir, "--resume", steps=14, every=12)) == 1
    assert stderr_lines(capsys) == [
        f"rlhf train: error: {out}: metrics.jsonl has 12 steps but there is no checkpoint to resume from; "
        "move metrics.jsonl away to start the run again"
    ]
    assert (out / "metrics.jsonl").read_text() == before


# -- one process per run folder ----------------------------------------------------------------


@pytest.fixture
def holder(tmp_path):
    """Start a process that owns a folder; yields (folder, process)."""
    folder = tmp_path / "busy"
    code = (
        "import sys, time\nfrom rlhf_env.algorithms.run.runfolder import claim_run_folder\n"
        "with claim_run_folder(sys.argv[1]):\n    print('ready', flush=True)\n    time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_folder_in_use_is_refused_naming_the_holder(holder, tmp_path, model_dir, capsys):
    folder, proc = holder
    assert cli.main(sft(folder, model_dir)) == 1
    line = stderr_lines(capsys)[0]
    assert line.startswith(f"rlhf train: error: {folder} is in use by pid {proc.pid} (")
    assert line.endswith(
        "one process at a time writes a run folder: wait for it to finish (or stop it), or use another output folder"
    )
    suite = tmp_path / "tiny.toml"
    suite.write_text('seeds = [0]\nalgorithms = ["sft"]\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n')
    assert cli.main(["bench", "--suite", str(suite), "--out", str(folder), "--workers", "0", "--no-progress"]) == 1
    assert f"rlhf bench: error: {folder} is in use by pid {proc.pid} (" in capsys.readouterr().err
    assert not (folder / "runs").exists()


def test_a_stale_lock_of_a_dead_process_is_taken(holder, model_dir, capsys):
    folder, proc = holder
    proc.kill()  # killed: no clean-up, the lock file stays
    proc.wait()
    assert json.loads((folder / ".lock").read_text())["pid"] == proc.pid
    assert cli.main(sft(folder, model_dir)) == 0
    assert [r["step"] for r in rows(folder)] == [0, 1] and not (folder / ".lock").exists()
