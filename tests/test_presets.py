"""Pretrained-model defaults (algorithms/run/presets.py): applied under --model, never over a choice."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from rlhf_env.algorithms.run import presets
from rlhf_env.algorithms.zoo import dpo, grpo, ppo, sft
from rlhf_env.errors import RunWarning
from rlhf_env.plugins import cli


def test_each_family_declares_a_lower_lr_for_pretrained_models_and_a_higher_one_for_lora():
    for cls in (grpo.Config, grpo.DrConfig, ppo.Config, dpo.Config, dpo.SimPOConfig, sft.Config):
        full, lora = presets.pretrained_defaults(cls, False), presets.pretrained_defaults(cls, True)
        assert full["lr"] < cls().lr / 10, cls  # the tiny-model default is far too large for a real model
        assert full["lr"] < lora["lr"] < cls().lr, cls


def test_a_config_that_declares_nothing_keeps_its_defaults(monkeypatch):
    @dataclass
    class Plain:
        lr: float = 1e-3

    spec = SimpleNamespace(Config=Plain)
    assert presets.pretrained_defaults(Plain, True) == {}
    monkeypatch.setattr(presets, "is_pretrained", lambda path: True)
    assert presets.apply(spec, {"lr": 2e-3}, model_path="m", lora=False, resume=False) == {"lr": 2e-3}


def test_apply_only_under_a_given_model_and_never_over_an_explicit_value(capsys, monkeypatch):
    spec = SimpleNamespace(Config=grpo.Config)
    monkeypatch.setattr(presets, "is_pretrained", lambda path: True)
    assert presets.apply(spec, None, model_path=None, lora=False, resume=False) == {}
    assert presets.apply(spec, {"group_size": 4}, model_path="m", lora=False, resume=True) == {"group_size": 4}
    assert presets.apply(spec, {"lr": 3e-3}, model_path="m", lora=False, resume=False) == {"lr": 3e-3}
    assert capsys.readouterr().err == ""  # nothing applied, nothing said
    assert presets.apply(spec, {"group_size": 4}, model_path="m", lora=True, resume=False) == {
        "lr": 1e-5,
        "group_size": 4,
    }
    assert "pretrained-model defaults for grpo: lr=1e-05" in capsys.readouterr().err


def test_the_far_from_reference_warning_fires_once_past_the_bound():
    assert presets.kl_warning(presets.KL_WARNING_NATS, 3) is None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warned = presets.warn_far_from_reference(3.0, 0, False)
        warned = presets.warn_far_from_reference(12.1, 3, warned)
        warned = presets.warn_far_from_reference(20.0, 4, warned)
    assert warned and len(seen) == 1 and issubclass(seen[0].category, RunWarning)
    assert "12.1 nats from its reference at step 4" in str(seen[0].message)


def test_a_tiny_checkpoint_is_not_taken_for_a_pretrained_one(tmp_path):
    from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=3)
    path = save_tiny(model, tok, tmp_path / "ckpt")
    from rlhf_env.models import checkpoint_parameters

    # tied embeddings are stored once, as num_parameters() counts them
    assert checkpoint_parameters(path) == model.num_parameters() < presets.PRETRAINED_MIN_PARAMETERS
    assert not presets.is_pretrained(path)


def test_train_on_a_pretrained_checkpoint_records_the_pretrained_lr(tmp_path, monkeypatch, capsys):
    from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=3)
    path = str(save_tiny(model, tok, tmp_path / "ckpt"))
    monkeypatch.setattr(presets, "PRETRAINED_MIN_PARAMETERS", model.num_parameters())  # this one counts as one
    args = ["train", "--algo", "sft", "--task", "arithmetic", "--model", path, "--steps", "1", "--eval-every", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "pretrained-model defaults for sft: lr=1e-05" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["lr"] == pytest.approx(1e-5)
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--set", "lr=3e-4"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["lr"] == pytest.approx(3e-4)
    # --resume on a folder with nothing to resume (a bench cell's first start) is a new run: the presets apply
    assert cli.main([*args, "--out", str(tmp_path / "c"), "--resume"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["config"]["lr"] == pytest.approx(1e-5)
    # resuming keeps the recorded value: no preset over it, no mismatch
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--resume", "--steps", "2"]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["lr"] == pytest.approx(1e-5)


def test_a_fresh_run_started_as_resumable_gets_the_presets_too(tmp_path, monkeypatch):
    """Bench cells train with resume=True (continue if the folder holds a run): a fresh folder is a new run."""
    from rlhf_env import plugins
    from rlhf_env.algorithms.run.loop import train
    from rlhf_env.tasks import get_task
    from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=3)
    path = str(save_tiny(model, tok, tmp_path / "ckpt"))
    monkeypatch.setattr(presets, "PRETRAINED_MIN_PARAMETERS", model.num_parameters())
    spec, task = plugins.get_host().algorithms.get("sft"), get_task("arithmetic")
    train(spec, task, tmp_path / "cell", steps=1, model_path=path, resume=True, progress=False, algo_name="sft")
    assert json.loads((tmp_path / "cell" / "config.json").read_text())["config"]["lr"] == pytest.approx(1e-5)
