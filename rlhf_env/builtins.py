"""The built-in tasks, rewards and generator, registered through the same hooks as any plugin."""

from __future__ import annotations

from rlhf_env import rewards
from rlhf_env.fastgen import HFGenerateSampler
from rlhf_env.plugins import hookimpl
from rlhf_env.policy import GraphedSamplingPolicy, SamplingPolicy
from rlhf_env.tasks import (
    arithmetic,
    arithmetic_chat,
    calculator,
    guess_number,
    prompt_file,
    reasoning_gym,
    sentiment,
    verifiers,
)


@hookimpl
def rlhf_register_rewards(register):
    """Reward factories: ``factory(**options) -> reward(prompts, completions)``."""
    register("letter_fraction", rewards.letter_fraction)
    register("completion_length", rewards.completion_length)
    register("arithmetic_exact", lambda: arithmetic.exact_match)
    register("arithmetic_partial", lambda: arithmetic.partial_credit)
    register("vader", lambda: sentiment.vader_reward)
    # Verifiers of a final answer: they read each prompt's ``answer`` field (rlhf_env.tasks.fields).
    register("final_number", verifiers.final_number)
    register("boxed", verifiers.boxed)
    register("math_verify", verifiers.math_verify)
    register("exact_answer", verifiers.exact_answer)
    register("calculator_exact", lambda: calculator.exact_answer)


@hookimpl
def rlhf_register_tasks(register):
    """Task factories: ``factory(**knobs) -> Task``."""
    register("arithmetic", arithmetic.make_arithmetic_task)
    register("sentiment", sentiment.make_sentiment_task)
    register("arithmetic_chat", arithmetic_chat.make_arithmetic_chat_task)
    register("prompt_file", prompt_file.make_prompt_file_task)
    register("reasoning_gym", reasoning_gym.make_reasoning_gym_task)
    register("calculator", calculator.make_calculator_task)  # multi-turn: a tool the policy may call
    register("guess_number", guess_number.make_guess_number_task)


@hookimpl
def rlhf_register_commands(register):
    from rlhf_env.commands import COMMANDS

    for name, command in COMMANDS.items():
        register(name, command)


@hookimpl
def rlhf_register_generators(register):
    """Generation backends (``rlhf_env.generation.Generator``)."""
    register("kv_cache", SamplingPolicy)
    register("kv_cache_graph", GraphedSamplingPolicy)
    register("hf_generate", HFGenerateSampler)
