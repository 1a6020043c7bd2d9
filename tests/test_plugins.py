"""The plugin contract (docs/architecture.md, "Decisions"): registration, duplicates, entry points, failures."""

from __future__ import annotations

import pytest

import rlhf_env
from rlhf_env import hookimpl, plugins

BUILTIN_REWARDS = (
    "letter_fraction",
    "completion_length",
    "arithmetic_exact",
    "arithmetic_partial",
    "vader",
    "final_number",
    "boxed",
    "math_verify",
    "exact_answer",
    "calculator_exact",
)


def named(entries) -> set[tuple[str, str]]:
    """(name, plugin) of each ``describe()`` entry."""
    return {(e["name"], e["plugin"]) for e in entries}


class ThingsPlugin:
    """Adds one algorithm, one task and one reward, with configurable names."""

    def __init__(self, algorithm="test_algo", task="test_task", reward="test_reward"):
        self.names = (algorithm, task, reward)

    @hookimpl
    def rlhf_register_algorithms(self, register):
        register(self.names[0], "an algorithm")

    @hookimpl
    def rlhf_register_tasks(self, register):
        register(self.names[1], "a task")

    @hookimpl
    def rlhf_register_rewards(self, register):
        register(self.names[2], "a reward")


def names(registry) -> list[str]:
    return [entry.name for entry in registry]


@pytest.fixture
def host():
    """A fresh host with the built-ins only (no entry points, whatever is installed)."""
    return plugins.PluginHost(builtins=plugins.BUILTIN_MODULES, autoload=False).load()


@pytest.fixture
def test_plugin(host):
    """Register ``ThingsPlugin`` as "test_plugin" for one test, then take it away."""
    host.register(ThingsPlugin(), name="test_plugin")
    yield host
    host.unregister("test_plugin")
    assert "test_reward" not in host.rewards  # unregistering really removes its things


def test_hookimpl_is_exported_from_rlhf_env():
    assert rlhf_env.hookimpl is plugins.hookimpl


def test_plugin_things_show_up_with_plugin_name(test_plugin):
    host = test_plugin
    assert host.algorithms.entry("test_algo").plugin == "test_plugin"
    assert host.tasks.entry("test_task").plugin == "test_plugin"
    assert host.rewards.get("test_reward") == "a reward"
    assert host.rewards.entry("test_reward").plugin == "test_plugin"
    assert host.failures == {}
    desc = host.describe()
    assert ("test_task", "test_plugin") in named(desc["tasks"])


def test_duplicate_name_rejects_whole_second_plugin(test_plugin):
    host = test_plugin
    # "clash" adds a fresh algorithm (an earlier hook kind) but reuses the reward name:
    # none of it may be registered, and the first plugin keeps its reward.
    host.register(ThingsPlugin(algorithm="clash_algo", task="clash_task"), name="clash")
    with pytest.warns(plugins.PluginLoadWarning, match="clash"):
        rewards = host.rewards
    assert "clash" in host.failures
    assert "test_reward" in host.failures["clash"] and "test_plugin" in host.failures["clash"]
    assert "clash_algo" not in host.algorithms and "clash_task" not in host.tasks
    assert rewards.entry("test_reward").plugin == "test_plugin"
    assert host.describe()["failed"] == [{"plugin": "clash", "error": host.failures["clash"]}]
    host.unregister("clash")
    assert "clash" not in host.failures


def test_failure_is_rejudged_once_the_conflict_is_gone(host):
    host.register(ThingsPlugin(), name="test_plugin")
    host.register(ThingsPlugin(algorithm="late_algo", task="late_task"), name="late")
    with pytest.warns(plugins.PluginLoadWarning):
        assert "late_algo" not in host.algorithms
    host.unregister("test_plugin")
    assert host.rewards.entry("test_reward").plugin == "late"
    assert "late" not in host.failures


def test_duplicate_of_builtin_name_is_rejected(host):
    host.register(ThingsPlugin(reward="letter_fraction"), name="shadow")
    with pytest.warns(plugins.PluginLoadWarning, match="letter_fraction"):
        entry = host.rewards.entry("letter_fraction")
    assert entry.plugin == "rlhf_env.builtins"
    assert "letter_fraction" in host.failures["shadow"]
    assert "test_algo" not in host.algorithms


def test_same_name_twice_in_one_plugin_is_rejected(host):
    class Twice:
        @hookimpl
        def rlhf_register_rewards(self, register):
            register("twice", 1)
            register("twice", 2)

    host.register(Twice(), name="twice_plugin")
    with pytest.warns(plugins.PluginLoadWarning):
        assert "twice" not in host.rewards
    assert "twice" in host.failures["twice_plugin"]


def test_entry_point_plugin_is_discovered(demo_dist):
    host = plugins.PluginHost().load()
    assert host.algorithms.entry("demo_algo").plugin == "demo"
    assert host.tasks.entry("demo_task").plugin == "demo"
    assert host.rewards.entry("demo_reward").plugin == "demo"
    assert host.rewards.get("demo_reward")()(["p"], ["a", "b"]) == [1.0, 1.0]
    for reward in BUILTIN_REWARDS:
        assert host.rewards.entry(reward).plugin == "rlhf_env.builtins"
    assert host.failures == {}


def test_broken_entry_points_are_reported_and_the_rest_load(demo_dist, write_dist):
    write_dist(
        demo_dist,
        "rlhf_broken_import",
        {"broken_import": "rlhf_broken_import"},
        {"rlhf_broken_import": "raise ImportError('needs a package that is not installed')\n"},
    )
    hook_source = """
        from rlhf_env import hookimpl

        @hookimpl
        def rlhf_register_algorithms(register):
            register("broken_algo", object())

        @hookimpl
        def rlhf_register_rewards(register):
            raise RuntimeError("reward hook exploded")
    """
    write_dist(demo_dist, "rlhf_broken_hook", {"broken_hook": "rlhf_broken_hook"}, {"rlhf_broken_hook": hook_source})

    with pytest.warns(plugins.PluginLoadWarning) as record:
        host = plugins.PluginHost().load()
        desc = host.describe()
    warned = " ".join(str(w.message) for w in record)
    assert "broken_import" in warned and "broken_hook" in warned
    assert "ImportError" in host.failures["broken_import"]
    assert "needs a package" in host.failures["broken_import"]
    assert "RuntimeError" in host.failures["broken_hook"] and "exploded" in host.failures["broken_hook"]
    assert "broken_algo" not in host.algorithms  # all-or-nothing per plugin
    assert {f["plugin"] for f in desc["failed"]} == {"broken_import", "broken_hook"}
    assert host.rewards.entry("demo_reward").plugin == "demo"
    assert set(BUILTIN_REWARDS) <= set(names(host.rewards))


def test_disable_autoload_env_skips_entry_points(demo_dist, monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    host = plugins.PluginHost().load()
    assert "demo_reward" not in host.rewards and "demo_algo" not in host.algorithms
    assert not host.pm.has_plugin("demo")
    assert set(BUILTIN_REWARDS) <= set(names(host.rewards))
    assert "arithmetic" in host.tasks
    # The process-wide host honours it too.
    plugins.reset_host()
    assert "demo_reward" not in plugins.get_host().rewards


def test_global_host_is_cached_and_resettable():
    plugins.reset_host()
    try:
        first = plugins.get_host()
        assert plugins.get_host() is first
        plugins.reset_host()
        assert plugins.get_host() is not first
    finally:
        plugins.reset_host()


def test_unknown_name_lists_registered_names(host):
    with pytest.raises(plugins.UnknownNameError) as excinfo:
        host.rewards.get("no_such_reward")
    message = str(excinfo.value)
    assert "no_such_reward" in message
    assert "completion_length, exact_answer, final_number, letter_fraction" in message  # sorted, all of them
    assert isinstance(excinfo.value, KeyError)
    with pytest.raises(plugins.UnknownNameError, match="registered: none"):
        plugins.Registry("algorithm").get("ppo_that_does_not_exist")


def test_builtin_rewards_registered_and_correct(host):
    for reward in BUILTIN_REWARDS:
        assert host.rewards.entry(reward).plugin == "rlhf_env.builtins"
    letter_fraction = host.rewards.get("letter_fraction")
    assert letter_fraction("e")(["p"], ["eeab"]) == [0.5]
    assert letter_fraction("a")(["p", "p", "p"], ["", "bbb", "aaaa"]) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        letter_fraction("ab")
    completion_length = host.rewards.get("completion_length")
    assert completion_length(max_chars=4)(["p"] * 3, ["", "ab", "abcdefg"]) == [0.0, 0.5, 1.0]
    assert completion_length()(["p"], ["x" * 8]) == [0.25]  # default max_chars=32


def test_builtin_tasks_are_registered_by_the_builtins_plugin(host):
    for name in ("arithmetic", "sentiment"):
        assert host.tasks.entry(name).plugin == "rlhf_env.builtins"
    task = host.tasks.get("arithmetic")(n_train=10, n_eval=5)
    assert task.gold_reward(["2+3="], ["5"]) == [1.0]


class EchoGame(rlhf_env.Interaction):
    """An interaction a third-party plugin adds: it repeats the policy's turn back."""

    description = "repeats the policy's turn"

    def respond(self, state, turn):
        return rlhf_env.Reply(f" {turn}", reward=1.0)


class GamesPlugin:
    @hookimpl
    def rlhf_register_interactions(self, register):
        register("echo_game", EchoGame)


def test_a_plugin_registers_an_interaction(host):
    host.register(GamesPlugin(), name="games")
    entry = host.interactions.entry("echo_game")
    interaction = entry.obj()  # a zero-argument factory
    assert entry.plugin == "games" and isinstance(interaction, rlhf_env.Interaction)
    assert interaction.respond(interaction.start("p"), "hi") == rlhf_env.Reply(" hi", 1.0, False)
    listed = {"name": "echo_game", "plugin": "games", "description": "repeats the policy's turn"}
    assert listed in host.describe()["interactions"]


def test_a_duplicate_interaction_name_is_a_clear_error(host):
    host.register(GamesPlugin(), name="games")
    host.register(GamesPlugin(), name="more_games")
    with pytest.warns(plugins.PluginLoadWarning, match="more_games"):
        assert host.interactions.entry("echo_game").plugin == "games"
    assert host.failures["more_games"] == (
        "failed to register: DuplicateNameError: interaction 'echo_game' from plugin 'more_games' "
        "is already registered by plugin 'games'"
    )
