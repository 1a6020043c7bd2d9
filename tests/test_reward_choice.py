"""`rlhf train --reward R`: gold, a registered reward, a reward model folder, a reward_model run.

The chosen reward is the proxy the run optimises (`reward/score`, `reward/proxy` on the eval
samples); the gold is always measured (`reward/gold`). Bad values fail before any work, one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

CHARS = "0123456789+-*= "


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny arithmetic policy, a reward model on its tokenizer, one on digits only, a 2-label classifier."""
    root = tmp_path_factory.mktemp("rewards")
    model, tok = build_tiny_model(build_char_tokenizer(CHARS), n_layer=1, n_embd=32, seed=0)
    out = {"model": save_tiny(model, tok, root / "model")}
    for name, chars, labels in (("rm", CHARS, 1), ("digits_rm", "0123456789", 1), ("two_labels", CHARS, 2)):
        t = build_char_tokenizer(chars)
        config = GPT2Config(vocab_size=len(t), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=labels)
        config.pad_token_id = t.pad_token_id
        torch.manual_seed(1)
        out[name] = save_tiny(GPT2ForSequenceClassification(config).eval(), t, root / name)
    return out


def train_argv(out, model, *extra, algo="reinforce", steps=2):
    argv = ["train", "--algo", algo, "--task", "arithmetic", "--model", str(model), "--out", str(out)]
    return [*argv, "--steps", str(steps), "--eval-every", str(steps), "--set", "num_envs=4", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf train: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_reward_model_folder_is_the_proxy_and_gold_is_still_measured(tmp_path, dirs, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(out, dirs["model"], "--reward", str(dirs["rm"]))) == 0, capsys.readouterr().err
    last = records(out)[-1]
    # The random reward model scores near 0 in a tiny band; the gold of a random policy is 0 or -1-ish.
    assert last["reward/proxy"] != last["reward/gold"]
    assert abs(last["reward/score"]) < 5 and "reward/gold" in last
    assert json.loads((out / "config.json").read_text())["reward"] == str(dirs["rm"].resolve())
    assert "reward/proxy=" in capsys.readouterr().out
    # Resuming with another reward is refused (the run's settings are kept), then allowed with --override.
    argv = train_argv(out, dirs["model"], "--reward", "completion_length:max_chars=4", steps=3)
    assert cli.main([*argv, "--resume"]) == 1
    assert error_line(capsys).startswith(
        f"rlhf train: error: {out} holds a run with other settings: reward {str(dirs['rm'].resolve())!r} -> "
        "'completion_length:max_chars=4'"
    )
    # Without --reward a resumed run keeps its own; --override changes it (recorded).
    assert cli.main([*train_argv(out, dirs["model"], steps=3), "--resume"]) == 0
    assert json.loads((out / "config.json").read_text())["reward"] == str(dirs["rm"].resolve())
    argv = train_argv(out, dirs["model"], "--reward", "completion_length:max_chars=4", steps=4)
    assert cli.main([*argv, "--resume", "--override"]) == 0
    last = records(out)[-1]
    assert last["step"] == 3 and 0 <= last["reward/proxy"] <= 1  # a completion length share, capped at 1
    assert json.loads((out / "config.json").read_text())["overrides"][0]["changes"]["reward"]["new"] == (
        "completion_length:max_chars=4"
    )


def test_a_registered_reward_with_options_and_gold(tmp_path, dirs, capsys):
    out = tmp_path / "run"
    assert cli.main(train_argv(out, dirs["model"], "--reward", "letter_fraction:letter=7", steps=1)) == 0
    assert json.loads((out / "config.json").read_text())["reward"] == "letter_fraction:letter=7"
    assert 0 <= records(out)[-1]["reward/proxy"] <= 1
    gold = tmp_path / "gold"
    assert cli.main(train_argv(gold, dirs["model"], "--reward", "gold", steps=1)) == 0
    last = records(gold)[-1]
    assert "reward/proxy" not in last and last["reward/score"] == pytest.approx(last["reward/score"])
    assert json.loads((gold / "config.json").read_text())["reward"] == "gold"


def test_a_reward_model_run_folder(tmp_path, dirs, capsys):
    rm_run = tmp_path / "rm_run"
    argv = ["train", "--algo", "reward_model", "--task", "arithmetic", "--model", str(dirs["model"])]
    argv += ["--out", str(rm_run), "--steps", "1", "--set", "num_pairs=8", "--set", "num_heldout_pairs=8"]
    assert cli.main([*argv, "--set", "batch_size=8"]) == 0, capsys.readouterr().err
    out = tmp_path / "run"
    assert cli.main(train_argv(out, dirs["model"], "--reward", str(rm_run), steps=1)) == 0, capsys.readouterr().err
    assert "reward/proxy" in records(out)[-1]
    # Another algorithm's run folder is not a reward model.
    assert cli.main(train_argv(tmp_path / "again", dirs["model"], "--reward", str(out))) == 1
    assert (
        error_line(capsys)
        == f"rlhf train: error: reward {str(out)!r}: {out} is a reinforce run, not a reward_model run"
    )


@pytest.mark.parametrize(
    "value, said",
    [
        (
            "nonesuch",
            "reward 'nonesuch': unknown reward 'nonesuch'; use gold, a registered reward (arithmetic_exact, arithmetic_partial,",
        ),
        (
            "letter_fraction:colour=red",
            "reward 'letter_fraction:colour=red': unknown options ['colour']; known: ['letter']",
        ),
        (
            "letter_fraction:letter=ab",
            "reward 'letter_fraction:letter=ab': letter must be a single character, got 'ab'",
        ),
        (  # issue 20 §3b: refused here, not as an internal error (a division by zero) at the first step
            "completion_length:max_chars=0",
            "reward 'completion_length:max_chars=0': max_chars must be an integer >= 1 (the length that scores 1), got 0",
        ),
        ("./no/such/folder", "reward './no/such/folder': no such folder (nor a registered reward)"),
        ("{model}", "reward '{model}': not a reward model ("),
        (
            "{two_labels}",
            "reward '{two_labels}': not a reward model (a reward model needs exactly one label, this one has 2)",
        ),
        ("{digits_rm}", "reward '{digits_rm}': the reward model's tokenizer cannot encode task 'arithmetic' (unknown"),
    ],
)
def test_bad_rewards_fail_before_any_work_naming_the_value(tmp_path, dirs, capsys, value, said):
    value, said = value.format(**dirs), said.format(**dirs)
    out = tmp_path / "run"
    assert cli.main(train_argv(out, dirs["model"], "--reward", value)) == 1
    assert error_line(capsys).startswith(f"rlhf train: error: {said}")
    assert not out.exists()
