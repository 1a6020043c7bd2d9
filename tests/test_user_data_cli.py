"""Users' own data from the CLI: ``--task NAME:KEY=VALUE``, ``--max-new-tokens``, prompt files, ``--reward module:function``."""

from __future__ import annotations

import json

import pytest

from rlhf_env.bench.suite import SuiteError, load_suite
from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

GROUPS = ["--set", "num_prompts=2", "--set", "group_size=2", "--set", "num_minibatches=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture
def qa(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n" for a in range(5) for b in range(4))
    )
    return path


def grpo(out, model, task, *extra, steps=1):
    return [
        "train",
        "--algo",
        "grpo",
        "--task",
        task,
        "--model",
        str(model),
        "--out",
        str(out),
        "--steps",
        str(steps),
    ] + ["--eval-every", str(steps), *GROUPS, *extra]


def error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_on_a_prompt_file_resumes_with_its_length(tmp_path, model_dir, qa, capsys):
    out = tmp_path / "run"
    task = f"prompt_file:{qa},verifier=final_number"
    assert cli.main(grpo(out, model_dir, task, "--max-new-tokens", "3")) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == "prompt_file" and saved["task_config"]["max_new_tokens"] == 3
    assert saved["task_config"]["path"] == str(qa) and saved["task_config"]["verifier"] == "final_number"
    assert metrics(out)[0]["perf/tokens"] <= 2 * 2 * 3  # 4 completions of at most 3 tokens
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "2", "--eval-every", "2"]) == 0
    assert [r["step"] for r in metrics(out) if "perf/tokens" in r] == [0, 1]
    assert json.loads((out / "config.json").read_text())["task_config"]["max_new_tokens"] == 3  # restored
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3", "--max-new-tokens", "4"]) == 1
    assert "holds a run with other settings: task knob max_new_tokens 3 -> 4" in error_line(capsys)
    qa.write_text(qa.read_text() + json.dumps({"prompt": "9+9=", "answer": 18}) + "\n")
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 1
    assert "task knob sha256" in error_line(capsys)  # the file changed under the run


def test_task_knob_errors_are_one_line(tmp_path, model_dir, qa, capsys):
    assert cli.main(grpo(tmp_path / "a", model_dir, "arithmetic:digitz=1")) == 1
    line = error_line(capsys)
    assert line.startswith("rlhf train: error: --task arithmetic: unknown knobs ['digitz']; known: ['digits',")
    assert cli.main(grpo(tmp_path / "b", model_dir, "arithmetic:digits=one")) == 1
    assert error_line(capsys) == "rlhf train: error: --task arithmetic digits: expected an integer, got 'one'"
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\n1+1=\n2+2=\n")
    assert cli.main(["base-model", "--task", f"prompt_file:{prompts},verifier=completion_length"]) == 1
    assert error_line(capsys, "base-model").endswith("has no completion or answer column); pass a model with --model")
    dup = tmp_path / "dup.csv"
    dup.write_text("prompt,answer\n1+1=,2\n1+1=,3\n")
    assert cli.main(["rollout", "--task", f"prompt_file:{dup},verifier=final_number", "--model", str(model_dir)]) == 1
    assert error_line(capsys, "rollout") == (
        f"rlhf rollout: error: {dup}: line 3: prompt '1+1=' is also at line 2 with other fields; "
        "a prompt's fields (its answer) must be one"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rollout_and_base_model_take_knobs(model_dir, capsys):
    argv = [
        "rollout",
        "--task",
        "arithmetic:digits=1,n_train=40,n_eval=10,max_new_tokens=2",
        "--model",
        str(model_dir),
        "--episodes",
        "4",
    ]
    assert cli.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("episode")]
    assert len(lines) == 4 and all(
        "prompt='" in line and len(line.split("completion=")[1].split("'")[1]) <= 2 for line in lines
    )
    argv = [
        "base-model",
        "--task",
        "arithmetic:digits=1,n_train=40,n_eval=10",
        "--model",
        str(model_dir),
        "--eval-prompts",
        "4",
        "--json",
    ]
    assert cli.main([*argv, "--max-new-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval_prompts"] == 4 and all(len(e[1]) <= 2 for e in report["examples"])


def test_users_reward_function(tmp_path, model_dir, qa, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(
        "def quarter(prompts, completions, answer):\n    return [0.25 for a in answer]\n\n"
        "def one(prompts, completions):\n    return [1.0]\n\nTHRESHOLD = 3\n"
    )
    task = f"prompt_file:{qa},verifier=final_number"
    assert cli.main(grpo(tmp_path / "run", model_dir, task, "--reward", "my_rewards:quarter")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reward"] == "my_rewards:quarter"
    assert metrics(tmp_path / "run")[0]["reward/score"] == 0.25  # what GRPO optimised: the user's reward
    assert cli.main(grpo(tmp_path / "f", model_dir, task, "--reward", "./my_rewards.py:quarter")) == 0
    assert json.loads((tmp_path / "f" / "config.json").read_text())["reward"] == f"{tmp_path}/my_rewards.py:quarter"
    capsys.readouterr()
    bad = {
        "my_rewards:one": "reward 'my_rewards:one': the reward my_rewards.one returned 1 scores for 2 completions",
        "my_rewards:THRESHOLD": "reward 'my_rewards:THRESHOLD': my_rewards.THRESHOLD is not callable (a int)",
        "my_rewards:nope": "reward 'my_rewards:nope': module my_rewards has no attribute 'nope'; its functions: one, quarter",
        "no_such_module:fn": "reward 'no_such_module:fn': no module named 'no_such_module'",
        "./absent.py:fn": f"reward './absent.py:fn': no such file {tmp_path}/absent.py",
    }
    for value, start in bad.items():
        assert cli.main(grpo(tmp_path / "x", model_dir, task, "--reward", value)) == 1
        assert error_line(capsys).startswith(f"rlhf train: error: {start}"), value
    # A registered reward that reads fields on a task without them, refused before any work.
    assert cli.main(grpo(tmp_path / "x", model_dir, "arithmetic", "--reward", "final_number")) == 1
    assert "reward 'final_number' reads the field(s) answer of each prompt, but task 'arithmetic'" in error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_suite_tasks_take_the_universal_knob(tmp_path):
    suite = tmp_path / "s.toml"
    body = 'seeds = [0]\nalgorithms = ["grpo"]\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n'
    suite.write_text(body + "knobs = { digits = 1, max_new_tokens = 3 }\n")
    assert load_suite(suite).tasks[0].knobs == {"digits": 1, "max_new_tokens": 3}
    suite.write_text(body + 'knobs = { max_new_tokens = "3" }\n')
    with pytest.raises(SuiteError, match=r"tasks\[0\].knobs max_new_tokens: expected an integer, got str '3'"):
        load_suite(suite)
