"""Config overrides take their field's type: ``--set`` text is parsed, suite values are checked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env.algorithms.zoo import ppo
from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


def reinforce(out, model, *sets):
    """``rlhf train`` of one REINFORCE step on 4 episodes (unless ``sets`` gives num_envs)."""
    argv = ["train", "--algo", "reinforce", "--task", "arithmetic", "--model", str(model), "--out", str(out)]
    sets = sets if any(s.startswith("num_envs=") for s in sets) else ("num_envs=4", *sets)
    return [*argv, "--steps", "1", "--eval-every", "1", *(a for s in sets for a in ("--set", s))]


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("lr=abc", "--set lr: expected a number, got 'abc'"),
        ("lr=nan", "--set lr: expected a finite number, got 'nan'"),
        ("kl_coef=inf", "--set kl_coef: expected a finite number, got 'inf'"),
        ("num_envs=4.5", "--set num_envs: expected an integer, got '4.5'"),
        ("baseline=maybe", "--set baseline: expected true or false, got 'maybe'"),
        ("lr", "--set expects KEY=VALUE, got 'lr'"),
    ],
)
def test_a_bad_override_names_the_key_and_the_expected_type(tmp_path, model_dir, capsys, assignment, message):
    assert cli.main(reinforce(tmp_path / "run", model_dir, assignment)) == 1
    err = capsys.readouterr().err
    assert err == f"rlhf train: error: {message}\n"
    assert not (tmp_path / "run").exists()  # refused before any work


def test_false_is_false(tmp_path, model_dir):
    assert cli.main(reinforce(tmp_path / "run", model_dir, "baseline=False", "lr=1e-4")) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["baseline"] is False and config["lr"] == 0.0001 and config["num_envs"] == 4


@dataclass
class Knobs:
    widths: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] = (0.0, 1.0)
    clip: float | None = 0.2
    path: str | None = None
    mode: Literal["mean", "sum"] = "mean"
    names: list[str] | None = None


def test_text_is_parsed_into_tuples_optionals_and_choices():
    from rlhf_env.algorithms.run.overrides import typed_overrides

    text = {"widths": "[3, 4, 5]", "pair": "0.5,2", "clip": "none", "path": "None", "mode": "sum", "names": "a, b"}
    assert typed_overrides(Knobs, text, from_text=True) == {
        "widths": (3, 4, 5),
        "pair": (0.5, 2.0),
        "clip": None,
        "path": None,
        "mode": "sum",
        "names": ["a", "b"],
    }
    assert typed_overrides(ppo.Config, {"clip_value": "null", "whiten_advantages": "no"}, from_text=True) == {
        "clip_value": None,
        "whiten_advantages": False,
    }


def test_typed_values_are_checked_not_reinterpreted():
    from rlhf_env.algorithms.run.overrides import ConfigError

    spec = AlgorithmSpec(Knobs, object)
    assert spec.make_config(widths=[7], pair=[1, 2], clip=1) == Knobs(widths=(7,), pair=(1.0, 2.0), clip=1.0)
    for values, message in [
        ({"widths": "12"}, "widths: expected a tuple of integers, got str '12'"),  # not the tuple ('1', '2')
        ({"pair": [1.0]}, "pair: expected a tuple of 2 values (a number, a number), got list [1.0]"),
        ({"widths": [1, True]}, "widths[1]: expected an integer, got bool True"),
        ({"clip": "0.3"}, "clip: expected a number or none, got str '0.3'"),
        ({"mode": "max"}, "mode: expected one of 'mean', 'sum', got str 'max'"),
        (
            {"wdths": (1,)},
            "unknown config keys ['wdths']; known: ['clip', 'mode', 'names', 'pair', 'path', 'widths']",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            spec.make_config(**values)


@pytest.mark.parametrize("algo", ["gspo", "cispo", "dapo"])
def test_clip_eps_is_refused_where_the_loss_has_its_own_bounds(tmp_path, model_dir, capsys, algo):
    """GSPO, CISPO and DAPO clip with clip_eps_low/clip_eps_high: GRPO's clip_eps is no field of theirs."""
    argv = ["train", "--algo", algo, "--task", "arithmetic", "--model", str(model_dir), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--steps", "1", "--set", "clip_eps=0.3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlhf train: error: ") and err.count("\n") == 1
    assert "unknown config keys ['clip_eps']" in err and "clip_eps_high" in err
    assert not (tmp_path / "r").exists()  # refused before any work
