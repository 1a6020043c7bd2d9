"""LoRA through PEFT at the CLI: adapters trained, the reference is the base, checkpoints hold adapters, export merges."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from algorithms import lora
from rlhf_env import cli
from rlhf_env.models import load_causal_lm
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


def test_lora_without_peft_says_which_extra_to_install(model_dir, tmp_path, capsys, monkeypatch):
    # issue 20 §3e: an install without the `lora` extra (None in sys.modules makes `import peft` fail).
    monkeypatch.setitem(sys.modules, "peft", None)
    out = tmp_path / "run"
    assert cli.main(train_argv(model_dir, out, "--lora-rank", "2")) == 1
    assert error_line(capsys, "train") == (
        "rlhf train: error: LoRA (--lora-rank) needs PEFT, which is not installed: pip install 'rlhf_env[lora]'"
    )
    assert not out.exists()  # refused before any work
