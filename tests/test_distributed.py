"""Data-parallel ``rlhf train`` on CPU (gloo): 2 ranks make the update 1 rank makes; bad input fails first.

The ranks are forked from the test and run the CLI with the environment ``torchrun`` gives its
workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); forking skips the imports a
fresh ``torchrun`` worker would pay for.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

from rlhf_env.algorithms.scale.fsdp import full_weights
from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

# A task whose reward varies between completions of a random tiny model (0.25 per "1"), so the
# updates carry signal rather than rounding noise that Adam would blow up.
TASK_SOURCE = """
import dataclasses

from rlhf_env import hookimpl
from rlhf_env.tasks.arithmetic import make_arithmetic_task


def ones(prompts, completions):
    return [c.count("1") / 4 for c in completions]


@hookimpl
def rlhf_register_tasks(register):
    task = make_arithmetic_task(digits=1, n_train=40, n_eval=8)
    register("ones", lambda: dataclasses.replace(task, gold_reward=ones))
"""

GROUPS = ["--set", "num_prompts=4", "--set", "group_size=2", "--set", "num_minibatches=2"]
RUNS = {  # 4 prompts a step, 2 per rank; minibatches of 4 rows
    "grpo": ["--algo", "grpo", *GROUPS],
    "dapo": ["--algo", "dapo", *GROUPS],  # its loss averages over tokens
    "rloo": ["--algo", "rloo", "--set", "num_prompts=4", "--set", "k=2"],  # one update on the whole batch
    "grpo-lora": ["--algo", "grpo", *GROUPS, "--lora-rank", "4"],
}


@pytest.fixture
def setup(plugin_path, write_dist, tmp_path, monkeypatch):
    write_dist(plugin_path, "rlhf_demo_dp", {"dp": "rlhf_demo_dp"}, {"rlhf_demo_dp": TASK_SOURCE})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path / "model")


def train_argv(run, model, out, steps=2, extra=()):
    argv = ["train", "--task", "ones", "--model", str(model), "--out", str(out), *RUNS[run]]
    return [*argv, "--steps", str(steps), "--eval-every", "100", *extra]


def _rank(rank: int, port: int, runs: list[list[str]]) -> None:
    code = 1
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = max(cli.main(argv) for argv in runs)
    finally:
        os._exit(code)  # never run the parent's pytest teardown in the child


def run_two_ranks(runs: list[list[str]]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [multiprocessing.get_context("fork").Process(target=_rank, args=(r, port, runs)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    for p in ranks:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]


def weights(out):
    """The checkpoint's weights (a LoRA run's: its adapters)."""
    folder = out / "checkpoint"
    adapters = folder / "adapter_model.safetensors"
    return load_file(str(adapters if adapters.exists() else folder / "model.safetensors"))


def max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_make_the_update_one_rank_makes_and_resume_on_one(setup, tmp_path, monkeypatch):
    model = setup
    runs = [train_argv(run, model, tmp_path / f"two-{run}") for run in RUNS]
    fsdp = [train_argv("grpo", model, tmp_path / "fsdp", extra=["--fsdp"])]  # sharded: checkpoint, then resume
    run_two_ranks([*runs, *fsdp, train_argv("grpo", model, tmp_path / "fsdp", steps=3, extra=["--resume"])])
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1
    monkeypatch.setenv("RANK", "0")
    base = load_file(str(model / "model.safetensors"))
    for run in RUNS:
        one, two = tmp_path / f"one-{run}", tmp_path / f"two-{run}"
        assert cli.main(train_argv(run, model, one)) == 0
        w = weights(one)
        moved = max(float(v.abs().max()) for k, v in w.items() if "lora_B" in k) if "lora" in run else max_diff(w, base)
        assert moved > 3e-4  # the steps moved the weights (LoRA's B starts at 0; RLOO's lr is 3e-4) ...
        # ... the same way on 1 and on 2 ranks: up to float rounding, which Adam's first steps scale up
        # where a gradient is near zero (measured up to 1.7e-5 on grpo; a wrong batch moves ~moved)
        assert max_diff(weights(one), weights(two)) < 5e-5, run
        a, b = records(one), records(two)
        assert [r["step"] for r in b] == [0, 1]  # rank 0 alone wrote its records
        assert [r["reward/score"] for r in a] == [r["reward/score"] for r in b]  # the same rows were drawn
        # a mean of advantages that nearly cancel: float32 rounding of O(1) terms, not of the result
        assert [r["loss/policy"] for r in a] == pytest.approx([r["loss/policy"] for r in b], rel=1e-4, abs=1e-6)
    # A run started on 2 ranks resumes on 1 and continues as the 1-rank run does.
    assert cli.main(train_argv("grpo", model, tmp_path / "one-grpo", steps=3, extra=["--resume"])) == 0
    assert cli.main(train_argv("grpo", model, tmp_path / "two-grpo", steps=3, extra=["--resume"])) == 0
    assert max_diff(weights(tmp_path / "one-grpo"), weights(tmp_path / "two-grpo")) < 5e-5
    # FSDP2 on 2 ranks, 2 steps, a sharded checkpoint and a resumed third step: the same weights.
    assert (tmp_path / "fsdp" / "checkpoint" / "sharded").is_dir()
    assert not (tmp_path / "fsdp" / "checkpoint" / "model.safetensors").exists()
    assert [r["step"] for r in records(tmp_path / "fsdp")] == [0, 1, 2]
    assert max_diff(weights(tmp_path / "one-grpo"), full_weights(tmp_path / "fsdp" / "checkpoint")) < 5e-5


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf train: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_data_parallel_input_fails_before_any_work(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(train_argv("grpo", setup, tmp_path / "three")) == 1
    assert error_line(capsys) == (
        "rlhf train: error: world size 3 does not divide the batch (num_prompts=4); use a num_prompts that is a multiple of 3"
    )
    assert not (tmp_path / "three").exists()  # no process group, no folder: nothing was started
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(train_argv("grpo", setup, tmp_path / "nccl", extra=["--backend", "nccl", "--device", "cpu"])) == 1
    if torch.cuda.is_available():
        expected = "the NCCL backend runs on CUDA devices, not cpu; use --backend gloo on CPU"
    else:
        expected = "the NCCL backend needs CUDA GPUs and this machine has none; use --backend gloo on CPU"
    assert error_line(capsys) == f"rlhf train: error: {expected}"
    assert not (tmp_path / "nccl").exists()
    assert cli.main(train_argv("grpo", setup, tmp_path / "fsdp", extra=["--fsdp"])) == 1
    assert error_line(capsys) == (
        "rlhf train: error: --fsdp needs torchrun with 2 or more processes, and full fine-tuning (not --lora-rank)"
    )
