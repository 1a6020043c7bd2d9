"""``guess_number``: a multi-turn game, guess a hidden integer in [1, high] from higher/lower feedback.

An episode (``g0006:`` is the prompt; policy turns and the game's replies alternate)::

    g0006:8? h;12? l;10?            target 10: solved at turn 3, gold 1 − 2/6

* The prompt ``g<id>:`` names a game by a 4-digit id; its target is ``target(prompt, high)``, a
  hash of the id, so the gold is exact and recomputable from ``(prompt, transcript)`` alone.
  Train and eval prompts are disjoint sets of ids.
* A policy turn ends at the stop string ``?``: ``<integer>?`` is a guess (a leading space is
  allowed). The game replies ``" h;"`` (the target is higher), ``" l;"`` (lower), ``" e;"`` to a
  malformed turn (not a number, out of range; it still costs a turn) and ends the episode on a
  hit. A turn that ends at EOS (no ``?``) ends the episode: the policy stopped playing.
* ``max_turns = ceil(log2 high) + 2``: binary search needs at most ``floor(log2 high) + 1``.
* Gold: ``1 − (k − 1) / max_turns`` for a hit at policy turn ``k`` (malformed turns count), 0
  when the game is never solved. It replays the transcript against the target: each policy turn
  is the text up to the next ``?``, and the reply the game gives it is skipped, so the policy's
  guesses are what is scored, never text that looks like a reply (a turn ``" h;5?"`` is a
  malformed guess, not a turn that was answered). Binary search (floor midpoints) scores
  0.604 on average at ``high=16`` (3.375 turns); uniform random guesses ignoring the feedback 0.197.
* SFT data are whole transcripts (policy turns and replies, as the env's char tokenizer holds
  them) of simulated players: binary search, guesses drawn anywhere in the interval the feedback
  left, guesses some way off the midpoint (not always consistent with it), and now and then a
  malformed turn. The base model learns the format and plays far from optimally.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf_env.errors import SettingError
from rlhf_env.interaction import Interaction, Reply
from rlhf_env.tasks.base import BaseModelRecipe, Task, sized_recipe

HIGHER, LOWER, ERROR = " h;", " l;", " e;"
STOP = "?"
CHARS = "0123456789g:?hle; "  # the char tokenizer's alphabet: prompts, guesses, replies
N_IDS = 10_000  # 4-digit game ids
_PROMPT = re.compile(r"^g(\d{4}):$")
_GUESS = re.compile(r"^ ?(\d{1,4})\?$")
# Simulated players of the SFT data, and their shares.
PLAYERS = {"binary": 0.35, "interval": 0.45, "off": 0.2}
MALFORMED_RATE = 0.06  # per turn of every player


def max_turns_for(high: int) -> int:
    """``ceil(log2 high) + 2``: binary search's worst case, ``floor(log2 high) + 1``, with room to spare."""
    return math.ceil(math.log2(high)) + 2


def target(prompt: str, high: int) -> int:
    """The hidden number of game ``prompt`` (``g<4 digits>:``) in [1, high]: a hash of its id."""
    m = _PROMPT.match(prompt)
    if not m:
        raise SettingError(f"not a guess_number prompt: {prompt!r} (expected like 'g0417:')")
    digest = hashlib.sha256(f"guess_number:{m.group(1)}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "big") % high


def parse_guess(turn: str, high: int) -> int | None:
    """The guess of a policy turn (``"12?"``, ``" 12?"``), or None when it is malformed or out of range."""
    m = _GUESS.match(turn)
    if not m:
        return None
    guess = int(m.group(1))
    return guess if 1 <= guess <= high else None


class GuessNumber(Interaction):
    """The game's side of an episode: ``h``/``l`` feedback, ``e`` for a malformed turn, done on a hit."""

    stop_strings = (STOP,)
    timeout_s = None  # pure Python, microseconds: no worker thread

    def __init__(self, high: int = 16):
        self.high = int(high)

    def start(self, prompt: str) -> dict:
        return {"target": target(prompt, self.high)}

    def respond(self, state: dict, turn: str) -> Reply:
        if not turn.endswith(STOP):  # the turn ended at EOS: the policy stopped playing
            return Reply(done=True)
        guess = parse_guess(turn, self.high)
        if guess is None:
            return Reply(ERROR)
        if guess == state["target"]:
            return Reply(done=True)
        return Reply(HIGHER if guess < state["target"] else LOWER)


@dataclass
class Replay:
    """An episode replayed from its transcript: the guess of each policy turn (None: malformed) and
    the turn (1-based) that hit the target (None: never)."""

    guesses: list[int | None]
    solved_at: int | None

    @property
    def turns(self) -> int:
        return len(self.guesses)


def replay(prompt: str, transcript: str, high: int, max_turns: int) -> Replay:
    """Replay ``transcript`` against the target: each policy turn runs to the next ``?`` and the
    game's reply to it is skipped. Text after the last ``?`` (a turn cut by EOS or the token
    budget) is no guess; a transcript that departs from the game's replies ends the replay there
    (what follows is not the game's), as does ``max_turns``."""
    game, guesses = GuessNumber(high), []
    state, pos = game.start(prompt), 0
    while len(guesses) < max_turns:
        end = transcript.find(STOP, pos)
        if end < 0:
            break
        turn = transcript[pos : end + 1]
        guesses.append(parse_guess(turn, high))
        reply = game.respond(state, turn)
        if reply.done:
            return Replay(guesses, len(guesses))
        pos = end + 1
        if not transcript.startswith(reply.text, pos):
            break
        pos += len(reply.text)
    return Replay(guesses, None)


def score(solved_at: int | None, max_turns: int) -> float:
    """``1 − (k − 1) / max_turns`` for a hit at turn ``k``, 0.0 for none."""
    return 0.0 if solved_at is None else 1.0 - (solved_at - 1) / max_turns


class GuessNumberGold:
    """The gold reward ``gold(prompts, transcripts) -> scores`` of a ``high``: ``score(replay(...))``."""

    def __init__(self, high: int = 16, max_turns: int | None = None):
        self.high = int(high)
        self.max_turns = max_turns_for(self.high) if max_turns is None else int(max_turns)
        self.__name__ = "guess_number_gold"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [
            score(replay(p, c, self.high, self.max_turns).solved_at, self.max_turns)
            for p, c in zip(prompts, completions)
        ]


def _malformed(rng: random.Random, high: int) -> str:
    return rng.choice(["0?", f"{high + rng.randint(1, 9)}?", "?", "hl?"])


def _next_guess(player: str, lo: int, hi: int, high: int, rng: random.Random) -> int:
    mid = (lo + hi) // 2
    if player == "binary":
        return mid
    if player == "interval":
        return rng.randint(lo, hi)
    return min(high, max(1, mid + rng.choice([-3, -2, -1, 1, 2, 3])))  # off the midpoint


def play(prompt: str, high: int, max_turns: int, player: str, rng: random.Random, malformed: float = 0.0) -> str:
    """A transcript of ``player`` (``PLAYERS``) on game ``prompt``: its turns and the game's replies,
    up to a hit or ``max_turns`` turns; each turn is malformed with probability ``malformed``."""
    game = GuessNumber(high)
    state, lo, hi, text = game.start(prompt), 1, high, ""
    for turn_number in range(1, max_turns + 1):
        if rng.random() < malformed:
            turn = _malformed(rng, high)
        else:
            guess = _next_guess(player, lo, hi, high, rng)
            turn = f"{guess}{STOP}"
        text += turn
        reply = game.respond(state, turn)
        if reply.done or turn_number == max_turns:  # the env injects nothing after the last turn
            break
        text += reply.text
        guess = parse_guess(turn, high)
        if reply.text == HIGHER:
            lo = max(lo, guess + 1)
        elif reply.text == LOWER:
            hi = min(hi, guess - 1)
    return text


def make_guess_number_task(
    high: int = 16,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    sft_steps: int = 400,
    model_size: str = "tiny",
) -> Task:
    """Games on ``[1, high]`` (2..999); ``n_train`` / ``n_eval`` disjoint game ids drawn by ``seed``.

    SFT data: one transcript per train game by a player drawn from ``PLAYERS``; demonstrations
    (the ``sft`` algorithm's): binary search on every train game. ``sft_steps`` keeps the base
    model short of the players it imitates, let alone binary search.
    """
    if not 2 <= high <= 999:
        raise SettingError(f"high must be in 2..999, got {high}")
    if n_train < 1 or n_eval < 1 or n_train + n_eval > N_IDS:
        raise SettingError(f"n_train and n_eval must be >= 1 with n_train + n_eval <= {N_IDS}, got {n_train}, {n_eval}")
    rng = random.Random(seed)
    ids = rng.sample(range(N_IDS), n_train + n_eval)
    prompts = [f"g{i:04d}:" for i in ids]
    train, evaluation = prompts[:n_train], prompts[n_train:]
    turns = max_turns_for(high)
    names, weights = list(PLAYERS), list(PLAYERS.values())
    sft = [(p, play(p, high, turns, rng.choices(names, weights)[0], rng, MALFORMED_RATE)) for p in train]
    digits = len(str(high))
    return Task(
        name="guess_number",
        train_prompts=train,
        eval_prompts=evaluation,
        gold_reward=GuessNumberGold(high, turns),
        sft_data=sft,
        demonstrations=[(p, play(p, high, turns, "binary", rng)) for p in train],
        # every turn a guess and its reply, with room for a few rambling turns (cut there)
        max_new_tokens=turns * (digits + 1 + len(HIGHER)) + 8,
        recipe=sized_recipe(
            BaseModelRecipe(n_layer=2, n_head=2, n_embd=64, sft_steps=sft_steps, batch_size=32, lr=3e-3, chars=CHARS),
            model_size,
            lr=1e-3,
        ),
        config={"high": high, "n_train": n_train, "n_eval": n_eval, "seed": seed, "sft_steps": sft_steps}
        | ({"model_size": model_size} if model_size != "tiny" else {}),
        interaction=functools.partial(GuessNumber, high),  # a fresh game per env, picklable
        max_turns=turns,
        max_injection_tokens=len(HIGHER),
    )
