"""The hooks a plugin may implement.

Each hook receives a ``register`` callable; a plugin calls it once per thing it adds,
``register(name, obj)``. A name may be taken only once per kind, across all plugins.
"""

from __future__ import annotations

import pluggy

PROJECT = "rlhf_env"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rlhf_register_algorithms(register):
    """Add training algorithms: ``register(name, algorithm)``."""


@hookspec
def rlhf_register_tasks(register):
    """Add tasks (prompt sets with a gold reward): ``register(name, task_factory)``."""


@hookspec
def rlhf_register_rewards(register):
    """Add reward functions: ``register(name, reward_factory)``.

    A reward factory takes keyword options and returns a callable
    ``reward(prompts: list[str], completions: list[str]) -> sequence of floats``.
    """


@hookspec
def rlhf_register_commands(register):
    """Add ``rlhf`` subcommands: ``register(name, rlhf_env.plugins.cli.Command(help, add_arguments, run))``.

    The built-in commands (``list``, ``rollout``, ``base-model``, ``train``, ``bench``) are
    registered through this hook too.
    """


@hookspec
def rlhf_register_generators(register):
    """Add generation backends: ``register(name, generator)``.

    A generator follows ``rlhf_env.generation.Generator``: called as
    ``generator(model, batch_size, pad_token_id=, vocab_size=, seed=, temperature=, greedy=)``
    it returns a sampler whose ``act(obs)`` gives ``{"token": (B,) int64, "logprob": (B,) float32}``.
    The rollout path picks one by name (``rlhf_env.rollout``; built in: ``kv_cache`` and
    ``hf_generate``). Optional: ``generate(obs, max_tokens)`` for whole completions (the
    chunked path, ``{"token": (B, K), "logprob": (B, K), "length": (B,)}``), and a class
    attribute ``exact_logprobs = True`` when its log-probs are a full forward's (otherwise
    trainers recompute them and correct with truncated importance sampling).
    """


@hookspec
def rlhf_register_interactions(register):
    """Add multi-turn interactions: ``register(name, interaction_factory)``.

    A factory takes no arguments and returns an ``rlhf_env.Interaction``: what answers a policy's
    turn in a multi-turn episode (a tool, a game, a simulated user; ``rlhf_env.interaction``), as a
    task's ``interaction`` does. ``rlhf_env.turn_adapter.TurnLevelInteraction`` makes one of a
    text-in, text-out env (GEM's games). A factory class's ``description`` shows in ``rlhf list``.
    """
