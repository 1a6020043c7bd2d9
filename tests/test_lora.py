"""LoRA through PEFT at the CLI: adapters trained, the reference is the base, checkpoints hold adapters, export merges."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_env.algorithms.scale import lora
from rlhf_env.models import load_causal_lm
from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny


@pytest.fixture
def model_dir(tmp_path):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path / "model")


def train_argv(model, out, *extra, steps=2):
    argv = ["train", "--algo", "grpo", "--task", "arithmetic", "--model", str(model), "--out", str(out)]
    argv += ["--steps", str(steps), "--eval-every", "100", "--set", "num_prompts=2", "--set", "group_size=2"]
    return [*argv, "--set", "kl_coef=0.5", "--set", "num_minibatches=1", *extra]


def test_lora_run_trains_adapters_against_the_base_and_exports_merged_weights(model_dir, tmp_path):
    run = tmp_path / "run"
    assert cli.main(train_argv(model_dir, run, "--lora-rank", "4", "--lora-target-modules", "c_attn,c_fc")) == 0
    ckpt = run / "checkpoint"
    assert not (ckpt / "model.safetensors").exists()  # the checkpoint holds the adapters only
    adapters = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert {k.split(".")[-3] for k in adapters} == {"c_attn", "c_fc"}  # the layers asked for, nothing else
    assert max(float(v.abs().max()) for k, v in adapters.items() if "lora_B" in k) > 0  # B starts at 0: trained
    assert json.loads((run / "config.json").read_text())["lora"]["rank"] == 4

    base = load_causal_lm(model_dir)
    settings = lora.LoraSettings(4, target_modules=("c_attn", "c_fc"))
    policy = lora.attach(load_causal_lm(model_dir), settings, ckpt)
    ref = lora.reference(policy)
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == sum(v.numel() for v in adapters.values())
    ids = torch.tensor([[1, 4, 2, 9, 3]])
    with torch.no_grad():
        adapted, base_logits, ref_logits = policy(ids).logits, base(ids).logits, ref(ids).logits
    assert torch.equal(ref_logits, base_logits)  # the reference: the same weights, adapters off
    assert (adapted - base_logits).abs().max() > 1e-4

    # Resume keeps the run's LoRA settings; export merges the adapters into a plain checkpoint.
    assert cli.main(train_argv(model_dir, run, "--resume", steps=3)) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    policy = lora.attach(load_causal_lm(model_dir), settings, ckpt)
    assert cli.main(["export-lora", str(run), str(tmp_path / "merged")]) == 0
    merged = load_causal_lm(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_modules())  # a plain model
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, policy(ids).logits, atol=1e-5)


def error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_lora_input_is_one_clear_line(model_dir, tmp_path, capsys):
    argv = train_argv(model_dir, tmp_path / "bad", "--lora-rank", "2", "--lora-target-modules", "q_proj,c_attn")
    assert cli.main(argv) == 1
    assert error_line(capsys, "train") == (
        "rlhf train: error: LoRA target modules ['q_proj'] are not in the model (GPT2LMHeadModel); "
        "its linear layers are: c_attn, c_fc, c_proj, lm_head"
    )
    assert cli.main(train_argv(model_dir, tmp_path / "bad2", "--lora-alpha", "8")) == 1
    assert error_line(capsys, "train") == (
        "rlhf train: error: --lora-alpha, --lora-dropout and --lora-target-modules need --lora-rank"
    )
    assert cli.main(train_argv(model_dir, tmp_path / "full")) == 0
    assert cli.main(["export-lora", str(tmp_path / "full"), str(tmp_path / "out")]) == 1
    line = error_line(capsys, "export-lora")
    assert line.startswith("rlhf export-lora: error: ") and "is not a LoRA run" in line


# An algorithm that changes no weight: its checkpoint holds the adapters as they were created.
STILL_SOURCE = """
from dataclasses import dataclass

from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env import hookimpl


@dataclass
class Config:
    pass


class Trainer:
    def __init__(self, ctx, config):
        pass

    def step(self, step, seed):
        return {"perf/tokens": 1}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@hookimpl
def rlhf_register_algorithms(register):
    register("still", AlgorithmSpec(Config, Trainer))
"""


def steady(records: list[dict]) -> list[dict]:
    """The records without their clock readings."""
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in records]


def test_same_seed_same_lora_run(model_dir, tmp_path):
    """Two runs in one process: the second starts with whatever the first left in torch's generator."""
    runs = {name: tmp_path / name for name in ("a", "b", "other_seed")}
    for name, out in runs.items():
        seed = "1" if name == "other_seed" else "0"
        assert cli.main(train_argv(model_dir, out, "--lora-rank", "4", "--seed", seed)) == 0
    a, b, c = (load_file(str(out / "checkpoint" / "adapter_model.safetensors")) for out in runs.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if "lora_A" in k)  # the adapters come from the seed
    metrics = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in runs.values()]
    assert steady(metrics[0]) == steady(metrics[1])


def test_independent_processes_start_from_the_same_adapters(model_dir, tmp_path, plugin_path, write_dist):
    """As ``torchrun``'s ranks are: separate interpreters, each drawing what it draws before training."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_dist(plugin_path, "rlhf_demo_still", {"still": "rlhf_demo_still"}, {"rlhf_demo_still": STILL_SOURCE})
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, str(plugin_path)])}
    adapters = []
    for name in ("rank0", "rank1"):
        out = tmp_path / name
        argv = ["train", "--algo", "still", "--task", "arithmetic", "--model", str(model_dir), "--out", str(out)]
        argv += ["--steps", "1", "--eval-every", "100", "--lora-rank", "4", "--seed", "3"]
        subprocess.run([sys.executable, "-m", "rlhf_env", *argv], env=env, check=True, capture_output=True)
        adapters.append(load_file(str(out / "checkpoint" / "adapter_model.safetensors")))
    a, b = adapters
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_A" in k)  # drawn, not zeros
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_lora_overwrites_nothing_and_takes_only_runs(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_argv(model_dir, run, "--lora-rank", "4", steps=1)) == 0
    config = (run / "config.json").read_bytes()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("my settings")
    refused = {
        run: f"rlhf export-lora: error: {run} is the run folder itself; export the merged model to a new or empty folder",
        notes: f"rlhf export-lora: error: {notes} is not empty; export the merged model to a new or empty folder "
        "(nothing is overwritten)",
        notes / "config.json": f"rlhf export-lora: error: {notes / 'config.json'} is a file; "
        "export the merged model to a new or empty folder",
    }
    for out, message in refused.items():
        assert cli.main(["export-lora", str(run), str(out)]) == 1
        assert error_line(capsys, "export-lora") == message
    assert (run / "config.json").read_bytes() == config  # the run can still resume
    assert (notes / "config.json").read_text() == "my settings" and len(list(notes.iterdir())) == 1

    assert cli.main(["export-lora", str(model_dir), str(tmp_path / "merged")]) == 1
    assert error_line(capsys, "export-lora") == (
        f"rlhf export-lora: error: {model_dir} is not a run folder: its config.json names no algorithm and task "
        "(a model's config?); export-lora takes a folder written by rlhf train --lora-rank"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["export-lora", str(run), str(empty)]) == 0
    assert load_causal_lm(empty) is not None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    assert cli.main(train_argv(model_dir, run, "--resume", steps=2)) == 0


def test_lora_without_peft_says_which_extra_to_install(model_dir, tmp_path, capsys, monkeypatch):
    # issue 20 §3e: an install without the `lora` extra (None in sys.modules makes `import peft` fail).
    monkeypatch.setitem(sys.modules, "peft", None)
    out = tmp_path / "run"
    assert cli.main(train_argv(model_dir, out, "--lora-rank", "2")) == 1
    assert error_line(capsys, "train") == (
        "rlhf train: error: LoRA (--lora-rank) needs PEFT, which is not installed: pip install 'rlhf_env[lora]'"
    )
    assert not out.exists()  # refused before any work
