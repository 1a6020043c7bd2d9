"""Turn-level (text in, text out) envs inside the token-level env: the ids are the prompt, the
policy's tokens and the observations tokenised once; turn rewards and ends are the text env's;
the score is its return. A hand-written env always; GEM's guess-the-number where gem-llm is installed."""

from __future__ import annotations

import itertools
import logging
import random

import numpy as np
import pytest
from tinyparts import assert_batch_exact, nudged_pair

from rlhf_env import MultiTurnVectorEnv, Reply, build_char_tokenizer, build_tiny_model
from rlhf_env.errors import SettingError
from rlhf_env.generation import make_sampler
from rlhf_env.rollout import EpisodeStream, first_episodes, to_batch
from rlhf_env.tiny import DEFAULT_CHARS
from rlhf_env.turn_adapter import TurnLevelInteraction, gem_render, turn_level_task
from rlhf_env.turns import INJECTED, POLICY

CHARS = "abn0123456789:=\n"


class Tally:
    """Shows ``n{seed}:``; a step answers ``={turn}:{b's in the action}`` with reward 0.25 per "b",
    plus 1 when the policy ended its turn without "a" (at EOS: ``terminated``); ``truncated`` at
    the third step. Every instance is logged in ``made``."""

    made: list[Tally] = []

    def __init__(self):
        self.seed, self.log = None, []  # log: (action, observation, reward, terminated, truncated)
        Tally.made.append(self)

    def reset(self, seed=None):
        self.seed, self.log = seed, []
        return f"n{seed}:", {}

    def step(self, action):
        b, stop = action.count("b"), not action.endswith("a")
        out = (f"={len(self.log) + 1}:{b}", 0.25 * b + stop, stop, len(self.log) == 2, {})
        self.log.append((action, *out[:4]))
        return out


def spans(ep) -> list[tuple[int, list[int]]]:
    """An episode's completion as (source, ids) runs: policy turns and injections."""
    out: list[tuple[int, list[int]]] = []
    for token, src in zip(ep.tokens.tolist(), ep.source.tolist()):
        if out and out[-1][0] == src:
            out[-1][1].append(token)
        else:
            out.append((src, [token]))
    return out


@pytest.fixture(scope="module")
def parts():
    return nudged_pair(CHARS)  # (tokenizer, reference, policy apart from it)


def test_a_text_env_through_the_adapter_is_exactly_what_the_token_env_holds(parts):
    """Each episode's ids are its prompt, the policy's turns (each the action its own env instance
    got) and the env's observations tokenised once after "\\n"; its turn rewards sit on each turn's
    last token, it ends where the text env said so, its score is the text env's return; the
    sampler's and the reference's log-probs are a full forward's."""
    tok, ref, policy = parts
    Tally.made = []
    task = turn_level_task("tally", Tally, 6, 2, stop_strings=("a",), max_turns=4, max_new_tokens=40)
    assert task.train_prompts == [f"n{s}:" for s in range(6)] and task.eval_prompts == ["n6:", "n7:"]
    env = MultiTurnVectorEnv(
        tok, ref, task.gold_reward, task.train_prompts, num_envs=8, group_size=2, max_new_tokens=40, beta=0.1,
        **task.env_options(),
    )  # fmt: skip
    sampler = make_sampler("kv_cache", policy, 8, pad_token_id=env.pad_token_id, vocab_size=env.vocab_size, seed=3)
    episodes = list(itertools.islice(EpisodeStream(env, sampler, 0), 48))  # autoreset: new instances
    eos, a = tok.eos_token_id, tok.convert_tokens_to_ids("a")
    ends = set()
    for ep in episodes:
        seed = task.fields[ep.prompt]["seed"]
        assert ep.prompt == f"n{seed}:" and ep.prompt_ids == tok(ep.prompt)["input_ids"]
        runs = spans(ep)
        turns, injected = [ids for s, ids in runs if s == POLICY], [ids for s, ids in runs if s == INJECTED]
        assert [s for s, _ in runs] == [POLICY, INJECTED] * len(injected) + [POLICY]
        sent = turns if turns[-1][-1] in (eos, a) else turns[:-1]  # the budget may cut the last turn
        actions = [tok.decode(t[:-1] if t[-1] == eos else t, skip_special_tokens=True) for t in sent]
        env_of = [e for e in Tally.made if e.seed == seed and [x[0] for x in e.log] == actions]
        assert env_of, (ep.prompt, actions)  # its own instance got exactly its turns ...
        log = env_of[0].log
        for (_, obs, *_), ids in zip(log, injected):  # ... and answered with what was injected
            assert ids == tok("\n" + obs, add_special_tokens=False)["input_ids"]
        assert len(injected) == len(turns) - 1 and ep.turns == len(log)
        # rewards: the text env's on the last token of each turn it answered, −β KL on every policy token
        mine = ep.source == POLICY
        turn_reward = ep.rewards + 0.1 * (ep.logprobs - ep.ref_logprobs)
        want = np.zeros(len(ep.tokens), np.float32)
        ends_at = np.cumsum([len(ids) for _, ids in runs]) - 1
        for k, (_, _, reward, _, _) in enumerate(log):
            want[ends_at[2 * k]] = reward
        np.testing.assert_allclose(turn_reward[mine], want[mine], atol=1e-5)
        assert ep.score == pytest.approx(sum(x[2] for x in log), abs=1e-6)  # the gold adds 0
        if log[-1][3] or log[-1][4]:  # the text env ended it: right after that turn
            assert len(sent) == len(turns)
            ends.add("terminated" if log[-1][3] else "truncated")
        else:
            ends.add("cut")
    assert ends == {"terminated", "truncated", "cut"} and max(ep.turns for ep in episodes) == 3
    batch = to_batch(episodes, env.pad_token_id, env.vocab_size)
    assert_batch_exact(batch, ref, policy)


class Halves:
    """Seeds 2k and 2k+1 show the same first observation, ``n{k}:``."""

    def reset(self, seed=None):
        self.seed = seed
        return f"n{seed // 2}:", {"suffix": "?"}

    def step(self, action):
        return f"{self.seed}", 1.0, False, False, {}


def test_prompts_are_distinct_first_observations_of_disjoint_seeds():
    task = turn_level_task("halves", Halves, 2, 2)
    # GEM's convention: the info's suffix on a line after the observation
    assert task.train_prompts == ["n0:\n?", "n1:\n?"] and task.eval_prompts == ["n2:\n?", "n3:\n?"]
    assert {p: f["seed"] for p, f in task.fields.items()} == {"n0:\n?": 0, "n1:\n?": 2, "n2:\n?": 4, "n3:\n?": 6}
    assert task.gold_reward(["n0:\n?"], ["x", "y"]) == [0.0, 0.0] and not task.needs_sft_data
    interaction = task.interaction()
    state = interaction.start("n1:\n?")
    assert state.seed == 2 and interaction.respond(state, "x") == Reply("\n2", 1.0, False)
    with pytest.raises(SettingError, match="'zz' is not one of the 4 prompts"):
        interaction.start("zz")
    with pytest.raises(SettingError, match=r"seeds 0\.\.9 give 5 distinct first observations, fewer than .* = 6"):
        turn_level_task("halves", Halves, 4, 2, max_seeds=10)

    class Drifting(Halves):
        resets = 0

        def reset(self, seed=None):
            Drifting.resets += 1
            return f"n{Drifting.resets}:", {}

    with pytest.raises(
        SettingError, match=r"shows '3:' where its prompt has '1:' \(character 1\): .* not deterministic"
    ):
        turn_level_task("drift", Drifting, 1, 1).interaction().start("n1:")


def test_old_gym_shapes_a_bare_reset_and_a_four_tuple_step():
    class Old:
        def reset(self, seed=None):
            return f"s{seed}"

        def step(self, action):
            return action.upper(), 0.5, action == "end", {}

    interaction = TurnLevelInteraction(Old, {"s3": 3}, separator=" ")
    state = interaction.start("s3")
    assert interaction.respond(state, "go") == Reply(" GO", 0.5, False)
    assert interaction.respond(state, "end") == Reply(None, 0.5, True)
    assert state.shown == ["s3", " GO"] and state.rewards == [0.5, 0.5] and state.terminated


def test_each_episode_keeps_its_own_global_rng_streams():
    """An env drawing from ``random`` and ``np.random`` (as GEM's do) gives each episode the
    streams of its seed, whatever runs beside it, and leaves the host's as they were."""

    class Dice:
        def reset(self, seed=None):
            return f"d{seed}", {}

        def step(self, action):
            return f"{random.randint(0, 9)}{np.random.randint(10)}", 0.0, False, False, {}

    interaction = TurnLevelInteraction(Dice, {"d0": 0, "d1": 1})
    py, npy = random.Random(0), np.random.RandomState(0)
    want = [f"\n{py.randint(0, 9)}{npy.randint(10)}" for _ in range(3)]  # seed 0's own streams
    random.seed(123)
    np.random.seed(123)
    host = random.getstate(), np.random.get_state()[1].copy()
    a, b = interaction.start("d0"), interaction.start("d1")
    got = []
    for _ in range(3):  # interleaved with another episode
        got.append(interaction.respond(a, "x").text)
        interaction.respond(b, "x")
    assert got == want
    assert random.getstate() == host[0] and (np.random.get_state()[1] == host[1]).all()


# -- GEM --------------------------------------------------------------------------------------
GEM_ENV = "game:GuessTheNumber-v0-easy"  # 1..10, 4 turns, no data to download


class Guesser:
    """A sampler that types ``\\boxed{k}`` on its k-th turn: GEM's guess-the-number, played 1, 2, 3, 4."""

    def __init__(self, tok):
        self.tok = tok

    def act(self, obs):
        tokens = []
        for r in range(len(obs["length"])):
            src = obs["source"][r, obs["prompt_length"][r] : obs["length"][r]]
            injected = np.flatnonzero(src == INJECTED)
            turn = int((np.diff(injected) > 1).sum() + 1) if len(injected) else 0  # injections so far
            typed = len(src) - (injected[-1] + 1 if len(injected) else 0)  # this turn's tokens so far
            script = self.tok(f"\\boxed{{{turn + 1}}}", add_special_tokens=False)["input_ids"]
            tokens.append(script[typed] if typed < len(script) else self.tok.eos_token_id)
        return {"token": np.array(tokens), "logprob": np.zeros(len(tokens), np.float32)}


@pytest.fixture(scope="module")
def gem_parts():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    gem = pytest.importorskip("gem")
    root.setLevel(level)  # importing gem calls logging.basicConfig(level=INFO): undo it for the other tests
    root.handlers[:] = handlers
    task = turn_level_task(
        "guess", lambda: gem.make(GEM_ENV), 4, 2, stop_strings=("}",), max_turns=6, max_injection_tokens=128,
        max_new_tokens=360,
    )  # fmt: skip
    tok = build_char_tokenizer(DEFAULT_CHARS + "\n")
    ref, _ = build_tiny_model(tok, seed=0, n_layer=1, n_embd=32, n_positions=1024)
    env = MultiTurnVectorEnv(
        tok, ref, task.gold_reward, task.train_prompts, num_envs=4, max_new_tokens=360, beta=0.0,
        **task.env_options(),
    )  # fmt: skip
    return gem, task, tok, ref, env


def test_gem_guess_the_number_played_through_the_adapter(gem_parts):
    """By GEM's rules, guessing 1, 2, 3, 4 at a target t <= 4 wins on turn t (reward 1); at t > 4 the
    fourth turn ends the game with 1 - (t - 4)/9. Each hint is injected as GEM words it."""
    gem, task, tok, _, env = gem_parts
    episodes = first_episodes(EpisodeStream(env, Guesser(tok), 0, {"prompts": task.train_prompts}), 4)
    targets = []
    for ep in episodes:
        game = gem.make(GEM_ENV)
        game.reset(seed=task.fields[ep.prompt]["seed"])
        t = game.game_number
        targets.append(t)
        turns, score = (t, 1.0) if t <= 4 else (4, 1 - (t - 4) / 9)
        assert ep.turns == turns and ep.score == pytest.approx(score, abs=1e-6)
        hints = [tok.decode(ids) for s, ids in spans(ep) if s == INJECTED]
        assert hints == [
            f"\nAt turn {k}, you guessed {k}, and the target number is higher than {k}.\nEnter your next guess."
            for k in range(1, turns)
        ]
    assert min(targets) <= 4 < max(targets)  # wins and a loss among the four games


def test_gem_episodes_of_a_tiny_model_score_their_gem_return(gem_parts):
    """Whatever the tiny model types, replaying its turns into a fresh GEM env of the prompt's seed
    gives the episode's turns, injections and score."""
    gem, task, tok, ref, env = gem_parts
    sampler = make_sampler("kv_cache", ref, 4, pad_token_id=env.pad_token_id, vocab_size=env.vocab_size, seed=0)
    episodes = first_episodes(EpisodeStream(env, sampler, 1), 4)
    for ep in episodes:
        game = gem.make(GEM_ENV)
        game.reset(seed=task.fields[ep.prompt]["seed"])
        runs = spans(ep)
        ret, shown, steps = 0.0, [], 0
        for s, ids in runs:
            if s != POLICY or not (ids[-1] == tok.eos_token_id or tok.decode(ids).endswith("}")):
                continue  # an injection, or a last turn the budget cut (never sent)
            obs, reward, terminated, truncated, info = game.step(
                tok.decode(ids[:-1] if ids[-1] == tok.eos_token_id else ids, skip_special_tokens=True)
            )
            ret, steps = ret + reward, steps + 1
            if terminated or truncated:
                break
            shown.append("\n" + gem_render(obs, info))
        assert ep.turns == steps and ep.score == pytest.approx(ret, abs=1e-6)
        assert [tok.decode(ids) for s, ids in runs if s == INJECTED] == shown
    assert all(ep.turns >= 1 for ep in episodes)
