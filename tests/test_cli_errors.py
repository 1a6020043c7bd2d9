"""User mistakes at the CLI: one line ``rlhf <command>: error: ...``, non-zero exit; ``--debug`` shows the traceback."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from rlhf_env.plugins import cli
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

# A third-party task whose gold reward returns text or None instead of numbers, and an
# algorithm whose step feels a Ctrl-C (a real SIGINT) at the step $TOY_SIGINT_AT.
PLUGIN_SOURCE = """
import dataclasses
import os
import signal
from dataclasses import dataclass

from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env import hookimpl
from rlhf_env.tasks.arithmetic import make_arithmetic_task


def verdicts(prompts, completions):
    return ["right" if c else "wrong" for c in completions]


def nothing(prompts, completions):
    return None


@dataclass
class Config:
    tokens: int = 10


class Trainer:
    def __init__(self, ctx, config):
        self.config = config

    def step(self, step, seed):
        if step == int(os.environ.get("TOY_SIGINT_AT", "-1")):
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C
        return {"perf/tokens": self.config.tokens}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class OomTrainer(Trainer):
    def step(self, step, seed):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def grumpy():
    def reward(prompts, completions):
        raise ValueError("no scores today")

    return reward


def clumsy():
    task = None
    return task.prompts  # a plugin's bug


@hookimpl
def rlhf_register_tasks(register):
    task = make_arithmetic_task(digits=1, n_train=40, n_eval=10)
    register("wordy", lambda: dataclasses.replace(task, gold_reward=verdicts))
    register("silent", lambda: dataclasses.replace(task, gold_reward=nothing))
    register("clumsy", clumsy)


@hookimpl
def rlhf_register_rewards(register):
    register("grumpy", grumpy)


@hookimpl
def rlhf_register_algorithms(register):
    register("sleepy", AlgorithmSpec(Config, Trainer))
    register("oom", AlgorithmSpec(Config, OomTrainer))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny arithmetic checkpoint (stands in for the task's base model: nothing is built)."""
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=0)
    return save_tiny(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture
def user_plugin(plugin_path, write_dist):
    module = "rlhf_demo_cli_errors"
    write_dist(plugin_path, module, {"cli_errors": module}, {module: PLUGIN_SOURCE})
    return plugin_path


def train_argv(out, model, *extra, algo="sft", task="arithmetic", steps=2, batch=4):
    """``rlhf train`` on a tiny model: ``batch`` examples a step (None: no batch_size), evaluated at the end."""
    argv = ["train", "--algo", algo, "--task", task, "--model", str(model), "--out", str(out), "--steps", str(steps)]
    return [*argv, "--eval-every", str(steps), *(["--set", f"batch_size={batch}"] if batch else []), *extra]


def error_line(capsys, command: str = "train") -> str:
    """The CLI's stderr, checked to be one error line (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rlhf {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_output_path_that_is_a_file(tmp_path, model_dir, capsys):
    out = tmp_path / "results.txt"
    out.write_text("my notes")
    assert cli.main(train_argv(out, model_dir)) == 1
    assert (
        error_line(capsys)
        == f"rlhf train: error: {out} is a file; the output path must be a folder (it holds the run's files)"
    )
    assert cli.main(["bench", "--suite", "quick", "--out", str(out)]) == 1
    assert error_line(capsys, "bench").startswith(f"rlhf bench: error: {out} is a file")
    assert out.read_text() == "my notes"


def test_debug_shows_the_traceback(tmp_path, model_dir):
    out = tmp_path / "results.txt"
    out.write_text("")
    with pytest.raises(ValueError, match="is a file"):  # rlhf_env.algorithms.run.runfolder.RunFolderError
        cli.main(train_argv(out, model_dir, "--debug"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_there(tmp_path, model_dir, capsys):
    assert cli.main(train_argv(tmp_path / "run", model_dir, "--device", "cuda")) == 1
    line = error_line(capsys)
    assert line.startswith("rlhf train: error: device 'cuda' is not available (") and line.endswith("; use cpu")
    assert cli.main(train_argv(tmp_path / "run", model_dir, "--device", "gpu")) == 1
    assert error_line(capsys) == "rlhf train: error: unknown device 'gpu'; use cpu, cuda or cuda:N"
    assert not (tmp_path / "run").exists()  # refused before any work
    suite = tmp_path / "gpu.toml"
    suite.write_text('seeds = [0]\ndevice = "cuda"\n[budget]\ntokens = 10\n[[tasks]]\nname = "arithmetic"\n')
    assert cli.main(["bench", "--suite", str(suite), "--out", str(tmp_path / "out")]) == 1
    assert error_line(capsys, "bench").startswith("rlhf bench: error: device 'cuda' is not available (")
    assert not (tmp_path / "out").exists()


def test_corrupted_model_safetensors(tmp_path, model_dir, capsys):
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    assert cli.main(train_argv(tmp_path / "run", broken)) == 1
    assert error_line(capsys).startswith(f"rlhf train: error: {weights}: damaged or incomplete safetensors file (")


def test_model_folder_with_only_pickle_weights(tmp_path, model_dir, capsys):
    from transformers import AutoModelForCausalLM

    legacy = shutil.copytree(model_dir, tmp_path / "legacy")
    model = AutoModelForCausalLM.from_pretrained(legacy)
    (legacy / "model.safetensors").unlink()
    torch.save(model.state_dict(), legacy / "pytorch_model.bin")
    assert cli.main(["rollout", "--task", "arithmetic", "--model", str(legacy), "--episodes", "1"]) == 1
    line = error_line(capsys, "rollout")
    assert line.startswith(
        f"rlhf rollout: error: {legacy} holds only pickle weights (pytorch_model.bin); "
        "models are loaded from safetensors only"
    )
    assert line.endswith("model.save_pretrained(path, safe_serialization=True)")


def test_invalid_utf8_in_a_data_file_names_the_file(tmp_path, model_dir, capsys):
    prefs = tmp_path / "prefs.jsonl"
    good, latin1 = b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}', b'{"prompt": "caf\xe9", "chosen": "a"}'
    prefs.write_bytes(good + b"\n" + latin1 + b"\n")
    assert cli.main(train_argv(tmp_path / "run", model_dir, "--set", f"preference_file={prefs}", algo="dpo")) == 1
    assert error_line(capsys) == (
        f"rlhf train: error: {prefs}: not UTF-8 text: byte 0xe9 at line 2, column 16 "
        "(invalid continuation byte); save the file as UTF-8"
    )


def test_arithmetic_preferences_in_csv_are_read_as_text(tmp_path, model_dir, capsys):
    prefs = tmp_path / "prefs.csv"
    prefs.write_text("prompt,chosen,rejected\n12+7=,19,18\n3+4=,7,8\n9*9=,81,18\n")
    argv = train_argv(tmp_path / "run", model_dir, "--set", f"preference_file={prefs}", algo="dpo", steps=1, batch=3)
    assert cli.main(argv) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["perf/tokens"] == 2 * (3 + 2 + 3)  # chosen + rejected characters, EOS included: 3 pairs


@pytest.mark.parametrize("task, said", [("wordy", "str 'right' at row 0"), ("silent", "NoneType None")])
def test_a_reward_that_returns_no_numbers_is_named(user_plugin, model_dir, capsys, task, said):
    fn = "verdicts" if task == "wordy" else "nothing"
    assert cli.main(["rollout", "--task", task, "--model", str(model_dir), "--episodes", "1", "--num-envs", "1"]) == 1
    assert error_line(capsys, "rollout") == (
        f"rlhf rollout: error: the reward rlhf_demo_cli_errors.{fn} returned {said}; "
        "a reward returns one number per completion"
    )


def test_ctrl_c_says_how_to_resume_and_the_same_command_does(
    user_plugin, tmp_path, model_dir, monkeypatch, capsys, request
):
    # A shell starts background jobs with SIGINT ignored, and Python keeps it so: give this
    # process the interactive default (SIGINT raises KeyboardInterrupt) as a user's terminal does.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    out = tmp_path / "run"
    argv = train_argv(out, model_dir, algo="sleepy", steps=3, batch=None)
    monkeypatch.setenv("TOY_SIGINT_AT", "1")
    try:
        code = cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended in a traceback")
    assert code == 130
    assert (
        error_line(capsys)
        == "rlhf train: interrupted; run the same command with --resume to continue from the last checkpoint"
    )
    assert not (out / ".lock").exists()  # the folder is free again
    monkeypatch.delenv("TOY_SIGINT_AT")
    assert cli.main([*argv, "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    monkeypatch.setenv("TOY_SIGINT_AT", "3")
    assert cli.main([*argv, "--steps", "5", "--resume"]) == 130
    assert error_line(capsys) == "rlhf train: interrupted; run the same command to resume"


def test_an_internal_error_is_one_line_that_points_to_debug(user_plugin, tmp_path, model_dir, capsys):
    assert cli.main(train_argv(tmp_path / "run", model_dir, task="clumsy")) == 1
    assert error_line(capsys) == (
        "rlhf train: error: AttributeError: 'NoneType' object has no attribute 'prompts' "
        "(an internal error; --debug shows the traceback)"
    )


def test_a_reward_that_raises_during_training_is_named(user_plugin, tmp_path, model_dir, capsys):
    # issue 20 §3c: the reward's own exception, told as the reward's, not as the library's internal error.
    argv = train_argv(
        tmp_path / "run", model_dir, "--reward", "grumpy", "--set", "num_envs=2", algo="reinforce", batch=None
    )
    assert cli.main(argv) == 1
    assert error_line(capsys) == "rlhf train: error: reward 'grumpy' raised ValueError: no scores today"


def test_a_torch_runtime_error_is_internal_and_points_to_debug(user_plugin, tmp_path, model_dir, capsys):
    # issue 20 §3i: a RuntimeError (torch, an OOM) is not the user's mistake: it gets the --debug hint.
    assert cli.main(train_argv(tmp_path / "run", model_dir, algo="oom", batch=None)) == 1
    assert error_line(capsys) == (
        "rlhf train: error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB "
        "(an internal error; --debug shows the traceback)"
    )


@pytest.mark.parametrize(
    "failure, said",
    [
        (OSError(28, "No space left on device"), "no space left on device"),
        (  # what torch.save raises on a full disk
            RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"),
            "PytorchStreamWriter failed writing file data/0 (is the disk full?)",
        ),
    ],
)
def test_a_full_disk_during_a_checkpoint_is_told_and_the_run_resumes(
    tmp_path, model_dir, monkeypatch, capsys, failure, said
):
    # issue 20 §3a: one line that says what happened, and the folder still resumes.
    out = tmp_path / "run"
    assert cli.main(train_argv(out, model_dir, steps=1)) == 0  # a checkpoint at step 1
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli.main([*train_argv(out, model_dir, steps=2), "--resume"]) == 1
    assert error_line(capsys) == (
        f"rlhf train: error: could not write checkpoint to {out / 'checkpoint'}: {said} "
        "(the run folder still resumes from step 1)"
    )
    assert not list(out.glob(".checkpoint-*")) and not (out / ".lock").exists()
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert cli.main([*train_argv(out, model_dir, steps=2), "--resume"]) == 0, capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
