"""Turn-level environments (text in, text out) inside the token-level env.

Most agent and game environments (GEM's, TextArena's) speak text a turn at a time:
``reset(seed=) -> (observation, info)`` and ``step(action_text) -> (observation, reward,
terminated, truncated, info)``. ``TurnLevelInteraction`` makes one an ``Interaction``: an
episode's ``start(prompt)`` resets a fresh env instance with the prompt's seed, and each policy
turn is one ``step``: the observation it returns is injected (tokenised once), its reward is the
turn's reward, ``terminated or truncated`` ends the episode. ``turn_level_task`` makes a ``Task``
of one: the prompts are the envs' first observations for seeds and the gold reward is 0, so an
episode's score is the env's return.

What the policy sees:

- its prompt: the first observation, as ``render(observation, info)`` shows it (by default GEM's
  convention: ``info["prefix"]`` + observation + ``info["suffix"]``, what GEM's own wrappers show);
- after each of its turns: ``separator`` + the next observation as ``render`` shows it, so the
  env's reply does not run on from the policy's text. The last observation (the step that ended
  the episode) is not injected: nothing acts on it.
- nothing else: the token sequence is the history. Pass the env raw, without a wrapper that
  repeats the history in every observation (GEM's ``concat*`` observation wrappers), or every
  turn injects the history again.

An episode cut before the env ended it (the interaction's ``max_turns``, the token budget)
scores the return of the steps it took; a turn cut by the budget never reaches the env.

Global RNGs: GEM seeds and draws from Python's and NumPy's global generators. Rows run
interleaved, so each episode keeps its own copy of both states (first seeded with its seed),
swapped in around its env's construction, reset and steps: an episode is the same whatever
runs beside it, and the host's streams are left as they were.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhf_env.errors import SettingError
from rlhf_env.interaction import Interaction, Reply
from rlhf_env.tasks.base import BaseModelRecipe, Task

__all__ = ["TurnLevelInteraction", "TurnLevelState", "gem_render", "turn_level_task", "zero_reward"]


def gem_render(observation: str, info: Mapping[str, Any]) -> str:
    """GEM's view of an observation: ``info``'s ``prefix`` and ``suffix`` around it (as GEM's
    observation wrappers put them; "Enter your next guess."), the suffix on a line of its own."""
    prefix, suffix = info.get("prefix", ""), info.get("suffix", "")
    if suffix and observation and not observation.endswith("\n"):
        observation += "\n"
    return f"{prefix}{observation}{suffix}"


def zero_reward(prompts, completions) -> list[float]:
    """The gold reward of a turn-level task: 0 (the env's rewards all arrive as turn rewards)."""
    return [0.0] * len(completions)


class _Streams:
    """One episode's states of Python's and NumPy's global RNGs, swapped in while its env runs."""

    def __init__(self, seed: int):
        self.state = (random.Random(seed).getstate(), np.random.RandomState(seed % 2**32).get_state())

    @contextmanager
    def active(self) -> Iterator[None]:
        host = random.getstate(), np.random.get_state()
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        try:
            yield
        finally:
            self.state = random.getstate(), np.random.get_state()
            random.setstate(host[0])
            np.random.set_state(host[1])


def _reset(env, seed: int) -> tuple[str, dict]:
    """``env.reset(seed=seed)`` as ``(observation, info)``: a bare observation (the old Gym shape) gets ``{}``."""
    out = env.reset(seed=seed)
    obs, info = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not isinstance(obs, str):
        raise TypeError(f"{type(env).__name__}.reset gave a {type(obs).__name__} observation, not text")
    return obs, dict(info or {})


def _step(env, action: str) -> tuple[str, float, bool, bool, dict]:
    """``env.step(action)`` as ``(observation, reward, terminated, truncated, info)``; a 4-tuple
    ``(observation, reward, done, info)`` (the old Gym shape) is ``terminated = done``."""
    out = env.step(action)
    if not isinstance(out, tuple) or len(out) not in (4, 5):
        raise TypeError(f"{type(env).__name__}.step must return a 5-tuple (or a 4-tuple), got {out!r:.80}")
    if len(out) == 5:
        obs, reward, terminated, truncated, info = out
    else:
        (obs, reward, terminated, info), truncated = out, False
    if not isinstance(obs, str):
        raise TypeError(f"{type(env).__name__}.step gave a {type(obs).__name__} observation, not text")
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"{type(env).__name__}.step gave a non-finite reward {reward}")
    return obs, reward, bool(terminated), bool(truncated), dict(info or {})


@dataclass
class TurnLevelState:
    """One episode: its own env instance and RNG streams, what it was shown, what it earned.

    shown: each text the policy saw, the prompt first, then each injection. rewards: each step's.
    """

    env: Any
    seed: int
    streams: _Streams
    shown: list[str]
    rewards: list[float] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False


class TurnLevelInteraction(Interaction):
    """A turn-level env as an ``Interaction`` (see the module docstring).

    Args:
        make_env: ``() -> env``, a fresh env instance (called once per episode: never shared).
        seeds: ``{prompt: seed}``: the seed whose reset shows that prompt (``turn_level_task`` builds it).
        render: ``(observation, info) -> text`` the policy is shown (default ``gem_render``).
        separator: put before every injected observation.
        stop_strings: text that ends a policy turn (besides the env's stop ids: EOS, end of turn).
        timeout_s: the longest one ``step`` may take (``Interaction.timeout_s``).
    """

    def __init__(
        self,
        make_env: Callable[[], Any],
        seeds: Mapping[str, int],
        *,
        render: Callable[[str, Mapping[str, Any]], str] | None = None,
        separator: str = "\n",
        stop_strings: tuple[str, ...] = (),
        timeout_s: float | None = 5.0,
    ):
        if not callable(make_env):
            raise TypeError(f"make_env must be a callable returning an env, got {type(make_env).__name__}")
        self.make_env, self.seeds = make_env, dict(seeds)
        self.render = render or gem_render
        self.separator, self.stop_strings, self.timeout_s = separator, tuple(stop_strings), timeout_s

    def show(self, observation: str, info: Mapping[str, Any]) -> str:
        text = self.render(observation, info)
        if not isinstance(text, str):
            raise TypeError(f"render must return text, got {type(text).__name__}")
        return text

    def first(self, seed: int) -> TurnLevelState:
        """A fresh env reset with ``seed``, in a state whose ``shown[0]`` is its prompt."""
        streams = _Streams(seed)
        with streams.active():  # construction may draw from the globals too (GEM's does)
            env = self.make_env()
            obs, info = _reset(env, seed)
        return TurnLevelState(env, seed, streams, [self.show(obs, info)])

    def start(self, prompt: str) -> TurnLevelState:
        seed = self.seeds.get(prompt)
        if seed is None:
            raise SettingError(
                f"prompt {prompt[:60]!r} is not one of the {len(self.seeds)} prompts this turn-level "
                "interaction knows: its prompts are its envs' first observations for their seeds"
            )
        state = self.first(seed)
        shown = state.shown[0]
        if shown != prompt:
            at = next((i for i, (x, y) in enumerate(zip(shown, prompt)) if x != y), min(len(shown), len(prompt)))
            raise SettingError(
                f"an env reset with seed {seed} shows {shown[at : at + 40]!r} where its prompt has "
                f"{prompt[at : at + 40]!r} (character {at}): make_env's envs are not deterministic in their seed"
            )
        return state

    def respond(self, state: TurnLevelState, turn: str) -> Reply:
        """One env step with the policy's ``turn``: its observation (not the last), reward and end."""
        with state.streams.active():
            obs, reward, terminated, truncated, info = _step(state.env, turn)
        state.rewards.append(reward)
        state.terminated, state.truncated = terminated, truncated
        if terminated or truncated:
            return Reply(None, reward, True)
        text = self.separator + self.show(obs, info)
        state.shown.append(text)
        return Reply(text, reward, False)


def turn_level_task(
    name: str,
    make_env: Callable[[], Any],
    n_train: int,
    n_eval: int,
    *,
    seed: int = 0,
    max_seeds: int | None = None,
    render: Callable[[str, Mapping[str, Any]], str] | None = None,
    separator: str = "\n",
    stop_strings: tuple[str, ...] = (),
    timeout_s: float | None = 5.0,
    max_turns: int = 8,
    max_injection_tokens: int = 64,
    max_new_tokens: int = 64,
    sft_data: list[tuple[str, str]] | None = None,
    recipe: BaseModelRecipe | None = None,
) -> Task:
    """A multi-turn ``Task`` on a turn-level env (the module docstring).

    The prompts are the first observations (as ``render`` shows them) of fresh envs reset with
    ``seed``, ``seed + 1``, ...: the first ``n_train`` distinct ones train, the next ``n_eval``
    evaluate (disjoint seeds, disjoint prompts). A seed whose first observation repeats an earlier
    one is skipped: a prompt names one seed. At most ``max_seeds`` seeds are tried (default
    ``20 (n_train + n_eval) + 100``); fewer distinct prompts is a ``SettingError``. Each prompt's
    seed is its ``fields`` entry ``{"seed": s}``. ``sft_data``: the base model's, when there is
    one (None: a task for given models). The rest are ``TurnLevelInteraction``'s and ``Task``'s.
    """
    if n_train < 1 or n_eval < 1:
        raise SettingError(f"task {name!r}: n_train and n_eval must be >= 1, got {n_train} and {n_eval}")
    want = n_train + n_eval
    max_seeds = 20 * want + 100 if max_seeds is None else max_seeds
    options = dict(render=render, separator=separator, stop_strings=tuple(stop_strings), timeout_s=timeout_s)
    probe = TurnLevelInteraction(make_env, {}, **options)
    seeds: dict[str, int] = {}
    for s in range(seed, seed + max_seeds):
        prompt = probe.first(s).shown[0]
        if not prompt:
            raise SettingError(f"task {name!r}: the env's first observation for seed {s} is empty")
        seeds.setdefault(prompt, s)
        if len(seeds) == want:
            break
    else:
        raise SettingError(
            f"task {name!r}: seeds {seed}..{seed + max_seeds - 1} give {len(seeds)} distinct first observations, "
            f"fewer than n_train + n_eval = {want} (an env whose first observation hides its seed's state "
            "has few distinct prompts: ask for fewer, or a render that tells them apart)"
        )
    prompts = list(seeds)
    config = dict(n_train=n_train, n_eval=n_eval, seed=seed, max_turns=max_turns, stop_strings=list(stop_strings))
    return Task(
        name,
        prompts[:n_train],
        prompts[n_train:],
        zero_reward,
        list(sft_data or []),
        max_new_tokens=max_new_tokens,
        recipe=recipe or BaseModelRecipe(),
        config=config,
        fields={p: {"seed": s} for p, s in seeds.items()},
        needs_sft_data=sft_data is not None,
        interaction=functools.partial(TurnLevelInteraction, make_env, seeds, **options),
        max_turns=max_turns,
        max_injection_tokens=max_injection_tokens,
    )
