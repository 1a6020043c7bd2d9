"""``rlhf bench`` refusing bad flags before any work, and leaving folders other processes hold alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tinyparts import TOY_ALGO_SOURCE

from rlhf_env.bench.runner import cell_dir
from rlhf_env.bench.suite import load_suite
from rlhf_env.plugins import cli

TASK_KNOBS = "knobs = { digits = 1, n_train = 80, n_eval = 20, sft_steps = 100 }"
REPO = Path(__file__).resolve().parents[1]


def error_line(capsys, command: str = "bench") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_negative_workers_is_refused_naming_the_flag_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "--suite", "quick", "--out", str(out), "--workers", "-2"]) == 1
    assert error_line(capsys) == "rlhf bench: error: --workers must be >= 0 (0: cells run in this process), got -2"
    assert not out.exists()


@pytest.fixture
def toy_plugin(plugin_path, write_dist):
    write_dist(plugin_path, "rlhf_demo_bench", {"bench_toys": "rlhf_demo_bench"}, {"rlhf_demo_bench": TOY_ALGO_SOURCE})
    return plugin_path


HOLDER = """
import sys, time
from rlhf_env.algorithms.run.runfolder import claim_run_folder
with claim_run_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_cell_folder_another_process_holds_is_reported_and_not_written_into(toy_plugin, tmp_path, capsys):
    # issue 20 §3h: a `rlhf train --out` (say) owns one cell's folder while the bench runs.
    body = (
        'seeds = [0]\nalgorithms = ["toy"]\neval_points = 1\neval_prompts = 8\n'
        f'[budget]\ntokens = 40\n[[tasks]]\nname = "arithmetic"\n{TASK_KNOBS}\n'
    )
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text(body)
    out = tmp_path / "o"
    path = cell_dir(out, load_suite(suite_file).cells()[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in path.iterdir())
        argv = ["bench", "--suite", str(suite_file), "--out", str(out), "--workers", "0", "--no-progress"]
        assert cli.main(argv) == 1
        text = capsys.readouterr().out
        assert f"skipped: {path} is in use by pid {holder.pid}" in text and "0 of 1 cells ok" in text
        assert sorted(p.name for p in path.iterdir()) == before  # no result.json, no error.txt
    finally:
        holder.kill()
        holder.wait()
