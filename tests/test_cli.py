"""The ``rlhf`` command line: ``list`` (text and JSON) and ``rollout``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_plugins import BUILTIN_REWARDS  # one list of the built-in rewards

from rlhf_env import commands, plugins, rollout
from rlhf_env.plugins import cli

EPISODE_LINE = re.compile(r"^episode +\d+ .* score=(\S+) +kl=(\S+) +return=(\S+)$")


def named(entries) -> set[tuple[str, str]]:
    """(name, plugin) of each ``describe()`` entry."""
    return {(e["name"], e["plugin"]) for e in entries}


@pytest.fixture
def fresh_host(monkeypatch):
    """The CLI uses the global host: start from, and leave, a clean one."""
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")  # only the built-ins, whatever is installed
    plugins.reset_host()
    yield
    plugins.reset_host()


def run_json(capsys) -> dict:
    assert cli.main(["list", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_list_json_has_the_describe_structure(fresh_host, capsys):
    desc = run_json(capsys)
    assert set(desc) == {"algorithms", "tasks", "rewards", "generators", "interactions", "commands", "failed"}
    for reward in BUILTIN_REWARDS:
        assert (reward, "rlhf_env.builtins") in named(desc["rewards"])
    assert ("arithmetic", "rlhf_env.builtins") in named(desc["tasks"])
    assert desc == plugins.get_host().describe()


def test_list_text_names_each_reward_and_its_plugin(fresh_host, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for reward in BUILTIN_REWARDS:
        assert any(reward in line and "rlhf_env.builtins" in line for line in lines), out
    assert "reinforce  " in out and f"rewards ({len(BUILTIN_REWARDS)})" in out
    assert "failed" not in out


def reasoning_gym_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith("reasoning_gym "))


def test_list_counts_the_reasoning_gym_datasets_and_names_them_on_request(fresh_host, capsys):
    from reasoning_gym.factory import DATASETS

    assert cli.main(["list"]) == 0
    line = reasoning_gym_line(capsys.readouterr().out)
    assert f"{len(DATASETS)} reasoning-gym datasets as --task reasoning_gym:NAME" in line
    assert "(rlhf list reasoning_gym names them)" in line
    assert cli.main(["list", "reasoning_gym"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"reasoning_gym datasets ({len(DATASETS)};")
    assert [n.strip() for n in lines[1:]] == sorted(DATASETS) and "basic_arithmetic" in DATASETS
    assert cli.main(["list", "reasoning_gym", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == sorted(DATASETS)


def test_list_says_how_to_install_reasoning_gym_when_it_is_missing(fresh_host, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym raises ImportError
    assert cli.main(["list"]) == 0
    line = reasoning_gym_line(capsys.readouterr().out)
    assert line.endswith(
        "reasoning-gym's datasets as --task reasoning_gym:NAME; not installed: pip install 'rlhf_env[reasoning]'"
    )
    assert cli.main(["list", "reasoning_gym"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "rlhf list: error: the reasoning_gym task needs the reasoning-gym package: pip install 'rlhf_env[reasoning]'"
    )


def test_list_one_section(fresh_host, capsys):
    assert cli.main(["list", "generators"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "generators (3)" and "kv_cache" in out
    assert "algorithms (" not in out and "tasks (" not in out
    assert cli.main(["list", "tasks", "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert list(desc) == ["tasks"] and ("reasoning_gym", "rlhf_env.builtins") in named(desc["tasks"])


def test_list_shows_entry_point_plugins_and_failures(demo_dist, write_dist, capsys):
    write_dist(demo_dist, "rlhf_broken_cli", {"broken_cli": "rlhf_broken_cli"}, {"rlhf_broken_cli": "import nope_x\n"})
    with pytest.warns(plugins.PluginLoadWarning, match="broken_cli"):
        desc = run_json(capsys)
    assert ("demo_reward", "demo") in named(desc["rewards"])
    assert ("demo_algo", "demo") in named(desc["algorithms"])
    assert [f["plugin"] for f in desc["failed"]] == ["broken_cli"]
    assert "ModuleNotFoundError" in desc["failed"][0]["error"]

    assert cli.main(["list"]) == 0  # same (cached) host: the text shows the failure too
    out = capsys.readouterr().out
    assert "failed plugins (1)" in out and "broken_cli" in out
    assert any("demo_task" in line and "demo" in line for line in out.splitlines())


def test_bad_usage_is_an_argparse_error(capsys):
    for argv in (["bogus"], [], ["rollout", "--episodes", "0"]):
        with pytest.raises(SystemExit) as excinfo:
            cli.main(argv)
        assert excinfo.value.code == 2
    assert "usage: rlhf" in capsys.readouterr().err


def test_rollout_prints_episodes_and_summary(capsys):
    assert cli.main(["rollout", "--episodes", "3", "--num-envs", "2", "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    episodes = [EPISODE_LINE.match(line) for line in lines if line.startswith("episode")]
    assert len(episodes) == 3 and all(episodes), lines
    for m in episodes:
        score, kl, ret = (float(x) for x in m.groups())
        assert abs(kl) < 1e-3  # the policy is a copy of the reference
        assert 0.0 <= score <= 1.0 and ret == pytest.approx(score - 0.05 * kl, abs=2e-4)
    summary = re.match(r"summary: episodes=(\d+) +mean_score=(\S+) +mean_return=(\S+) +tokens/s=(\S+)", lines[-1])
    assert summary and int(summary.group(1)) == 3 and float(summary.group(4)) > 0


def test_run_rollout_episodes_are_consistent():
    result = commands.run_rollout(episodes=5, num_envs=2, max_new_tokens=6, beta=0.5, seed=1)
    assert len(result.episodes) == 5
    assert {ep.row for ep in result.episodes} == {0, 1}
    assert result.tokens >= sum(len(ep.completion) for ep in result.episodes)  # char tokenizer
    for ep in result.episodes:
        assert len(ep.completion) <= 6  # at most max_new_tokens characters (EOS is not shown)
        assert abs(ep.kl) < 1e-4
        assert ep.score == pytest.approx(ep.completion.count("e") / len(ep.completion) if ep.completion else 0.0)
        assert ep.ret == pytest.approx(ep.score - 0.5 * ep.kl, abs=1e-5)


class ScriptedVectorEnv:
    """A 2-row vector env that replays fixed steps (reward, terminated, truncated, info)."""

    num_envs, max_new_tokens = 2, 4

    def __init__(self, steps):
        self.steps = iter(steps)
        one = np.array([1, 1])
        self.obs = {"input_ids": np.array([[7, 0, 0], [8, 0, 0]]), "length": one, "prompt_length": one}

    def reset(self, seed=None, options=None):
        return self.obs, {}

    def step(self, action):
        return (self.obs, *next(self.steps))


class ZeroSampler:
    def act(self, obs):
        return {"token": np.zeros(2, dtype=np.int64), "logprob": np.zeros(2, dtype=np.float32)}


def test_episode_stream_follows_next_step_autoreset():
    """Row 0 ends on step 2; step 3 is its reset (reward 0, not counted); row 1 runs on."""
    acting = np.array([True, True])
    no = np.array([False, False])
    text = {"prompt": np.array(["p0", "p1"], dtype=object), "completion": np.array(["ab", "c"], dtype=object)}
    end0 = {"kl": np.array([1.0, 4.0]), "_kl": acting, "score": np.array([0.8, 0.0]), **text}
    end1 = {"kl": np.array([5.0, 1.0]), "_kl": acting, "score": np.array([0.0, 0.9]), **text}
    steps = [
        (np.array([-0.1, -0.2]), no, no, {"kl": np.array([2.0, 4.0]), "_kl": acting}),
        (np.array([0.7, -0.2]), np.array([True, False]), no, end0),
        (np.array([0.0, -0.1]), no, no, {"kl": np.array([0.0, 1.0]), "_kl": np.array([False, True])}),
        (np.array([-0.3, 0.5]), no, np.array([False, True]), end1),
    ]
    stream = rollout.EpisodeStream(ScriptedVectorEnv(steps), ZeroSampler())
    eps = iter(stream)
    ended = next(eps)
    assert (ended.row, ended.prompt, ended.completion, ended.score, ended.kl) == (0, "p0", "ab", 0.8, 3.0)
    assert ended.ret == pytest.approx(0.6) and len(ended.tokens) == 2
    ended = next(eps)
    assert (ended.row, ended.prompt, ended.completion, ended.score, ended.kl) == (1, "p1", "c", 0.9, 10.0)
    assert ended.ret == pytest.approx(0.0, abs=1e-9) and len(ended.tokens) == 4
    assert stream.tokens == 7  # row 0's reset step generated nothing


def test_clip_quotes_and_shortens():
    assert commands.clip("abc", 10) == "'abc'"
    assert commands.clip("x" * 50, 10) == repr("x" * 9 + "\u2026")
    assert commands.clip("it's", 10) == '"it\'s"'


def console_script() -> str | None:
    here = Path(sys.executable).with_name("rlhf")
    return str(here) if here.exists() else shutil.which("rlhf")


@pytest.mark.skipif(console_script() is None, reason="the rlhf console script is not installed")
def test_console_script_lists_json():
    proc = subprocess.run([console_script(), "list", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    desc = json.loads(proc.stdout)
    assert ("letter_fraction", "rlhf_env.builtins") in named(desc["rewards"])


def test_task_commands_use_a_given_local_checkpoint(tmp_path, monkeypatch, capsys):
    from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny

    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=3)
    path = str(save_tiny(model, tok, tmp_path / "ckpt"))
    assert cli.main(["base-model", "--task", "arithmetic", "--model", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == path and report["eval_prompts"] == 64 and report["parameters"] == model.num_parameters()
    assert 0.0 <= report["gold_mean_sampled"] <= 1.0
    assert cli.main(["rollout", "--task", "arithmetic", "--model", path, "--episodes", "2", "--num-envs", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("episode")]
    assert len(lines) == 2 and all(re.search(r"prompt='\d+\+\d+='", line) for line in lines)
    assert not (tmp_path / "cache").exists()  # --model replaced the base model: nothing built


def test_every_command_is_a_plugin_registered_by_its_own_layer(fresh_host, capsys):
    desc = run_json(capsys)
    assert named(desc["commands"]) == {
        ("list", "rlhf_env.builtins"),
        ("rollout", "rlhf_env.builtins"),
        ("base-model", "rlhf_env.builtins"),
        ("convert", "rlhf_env.builtins"),
        ("train", "rlhf_env.algorithms.builtins"),
        ("export-lora", "rlhf_env.algorithms.builtins"),
        ("bench", "rlhf_env.bench.builtins"),
    }
    algos = {e["name"]: e["description"] for e in desc["algorithms"]}
    assert all(algos.values()) and algos["grpo"].startswith("GRPO")  # rlhf list shows one line each


COMMAND_SOURCE = """
from rlhf_env.plugins.cli import Command, UserError
from rlhf_env import hookimpl


def run(args):
    print(f"hello {args.name}")
    if args.name == "boom":
        raise UserError("no booms here")
    if args.name == "bug":
        raise ValueError("a plugin's own bug")
    return 0


@hookimpl
def rlhf_register_commands(register):
    register("hello", Command("say hello", lambda p: p.add_argument("--name", default="world"), run))
"""


def test_a_third_party_command_runs_like_a_built_in_one(plugin_path, write_dist, capsys):
    write_dist(
        plugin_path,
        "rlhf_demo_hello_cmd",
        {"hello_cmd": "rlhf_demo_hello_cmd"},
        {"rlhf_demo_hello_cmd": COMMAND_SOURCE},
    )
    plugins.reset_host()
    assert cli.main(["hello", "--name", "you"]) == 0
    assert capsys.readouterr().out == "hello you\n"
    assert cli.main(["hello", "--name", "boom"]) == 1
    assert capsys.readouterr().err == "rlhf hello: error: no booms here\n"
    # Only the library's error types are user errors; a bare ValueError is a bug and says so.
    assert cli.main(["hello", "--name", "bug"]) == 1
    assert capsys.readouterr().err == (
        "rlhf hello: error: ValueError: a plugin's own bug (an internal error; --debug shows the traceback)\n"
    )


def test_list_shows_a_plugins_interactions(fresh_host, capsys):
    from test_plugins import GamesPlugin

    plugins.get_host().register(GamesPlugin(), name="games")
    assert cli.main(["list", "interactions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("interactions (") and "algorithms (" not in "".join(lines)
    assert any(
        line.split() == ["echo_game", "plugin:", "games", "repeats", "the", "policy's", "turn"] for line in lines
    )
    assert cli.main(["list", "--json"]) == 0
    assert ("echo_game", "games") in named(json.loads(capsys.readouterr().out)["interactions"])
