"""The built-in tasks and rewards, registered through the same hooks as any plugin."""

from __future__ import annotations

from plugins import hookimpl
from rlhf_env import rewards
from rlhf_env.prompts import DEFAULT_PROMPTS


@hookimpl
def rlhf_register_rewards(register):
    register("letter_fraction", rewards.letter_fraction)
    register("completion_length", rewards.completion_length)


@hookimpl
def rlhf_register_tasks(register):
    register("default", lambda: {"prompts": DEFAULT_PROMPTS, "reward": rewards.letter_fraction("e")})
