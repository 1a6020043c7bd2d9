"""What answers a policy's turn in a multi-turn episode: tools, games, users.

A multi-turn episode alternates **policy turns** (tokens the policy samples) and **injected
spans** (tokens the env appends: a tool's result, a game's feedback). A policy turn ends at a
stop: one of the interaction's ``stop_strings`` completed by the turn's text (a tool call's
closing tag) or one of the env's stop ids (EOS, the chat template's end of turn). The env then
calls ``respond(state, turn)`` and gets a ``Reply``: text to inject (tokenised once, when
injected, and appended; the history is never re-tokenised), a reward for the turn, and whether
the episode is over. The episode's score (the reward on its last policy token) is the env's
reward of ``(prompt, transcript)``, the transcript being the decoded completion: policy turns and
injected spans as the tokens hold them.

    class Guess(Interaction):
        stop_strings = ()                       # a turn ends at EOS
        def start(self, prompt):  return {"target": 37, "turns": 0}
        def respond(self, state, turn):
            state["turns"] += 1
            guess = int(turn) if turn.isdigit() else None
            if guess == state["target"]:
                return Reply(done=True)
            return Reply(" higher\\n" if guess is not None and guess < state["target"] else " lower\\n")

Interactions are registered by name through ``rlhf_register_interactions`` (``plugins.hookspecs``)
as algorithms and tasks are. ``safe_respond`` is how the env calls one: an exception or a reply
slower than ``timeout_s`` becomes an injected error message the policy can read, never a crash.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

__all__ = ["Interaction", "Reply", "safe_respond", "CUT_MARKER"]

CUT_MARKER = " [cut]"  # appended to an injection cut at ``max_injection_tokens``


@dataclass
class Reply:
    """The env's answer to one policy turn.

    text: injected after the turn (None or "": nothing; with ``done`` ignored).
    reward: this turn's reward, added on the turn's last policy token (dense rewards).
    done: the episode ends after this turn (``terminated``), scored by the env's reward.
    """

    text: str | None = None
    reward: float = 0.0
    done: bool = False


class Interaction:
    """The other side of a multi-turn episode (see the module docstring). Subclass and override.

    ``stop_strings``: text that ends a policy turn when the turn's text ends with it.
    ``max_turn_tokens``: the longest policy turn, in tokens (None: no limit but the episode's).
    ``timeout_s``: the longest one ``respond`` may take (None: no limit).
    """

    stop_strings: tuple[str, ...] = ()
    max_turn_tokens: int | None = None  # a policy turn also ends after this many tokens
    timeout_s: float | None = 5.0

    def start(self, prompt: str) -> Any:
        """A new episode on ``prompt``: its state (any object; ``respond`` gets it back)."""
        return {}

    def respond(self, state: Any, turn: str) -> Reply:
        """Answer the policy's ``turn`` (its text, stop string included, stop id excluded).

        Called at every turn end, a stop id's (EOS, end of turn) included: ``Reply(done=True)`` ends
        the episode; a reply with no text after a stop id ends it too."""
        return Reply(done=True)


_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def safe_respond(interaction: Interaction, state: Any, turn: str) -> tuple[Reply, str | None]:
    """``(reply, error)``: the interaction's reply, or, when it raised or ran past ``timeout_s``, an
    error message as the reply's text (the episode goes on). A reply that is not a ``Reply`` is the
    interaction's bug: ``TypeError``."""
    global _POOL
    try:
        if interaction.timeout_s is None:
            reply = interaction.respond(state, turn)
        else:
            if _POOL is None:
                _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="rlhf-interaction")
            future = _POOL.submit(interaction.respond, state, turn)
            reply = future.result(timeout=interaction.timeout_s)
    except concurrent.futures.TimeoutError:
        error = f"timed out after {interaction.timeout_s:g} s"
        return Reply(f" [error: {error}]"), error
    except Exception as exc:  # a tool that raises is the policy's problem to read, not a crash
        error = f"{type(exc).__name__}: {exc}"
        return Reply(f" [error: {error}]"), error
    if not isinstance(reply, Reply):  # the interaction's own bug, not the policy's: say so
        raise TypeError(f"{type(interaction).__name__}.respond returned {type(reply).__name__}, not a Reply")
    return reply, None
