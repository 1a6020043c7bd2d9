"""The guess_number task: its gold by hand (replayed guesses, never reply-like text), the game's
replies, scripted episodes through the multi-turn env, its SFT transcripts, and its base model."""

from __future__ import annotations

import hashlib
import json
import statistics

import numpy as np
import pytest

from rlhf_env import MultiTurnVectorEnv, build_char_tokenizer, build_tiny_model
from rlhf_env.tasks import evaluate, get_task
from rlhf_env.tasks.guess_number import (
    CHARS,
    GuessNumber,
    GuessNumberGold,
    make_guess_number_task,
    max_turns_for,
    replay,
    target,
)

# Targets at high=16 (the hash of the id, pinned): g0006 -> 10, g0005 -> 8, g0001 -> 1.
TEN, EIGHT, ONE = "g0006:", "g0005:", "g0001:"


def test_the_target_is_a_hash_of_the_game_id():
    digest = hashlib.sha256(b"guess_number:0006").digest()
    assert target(TEN, 16) == 1 + int.from_bytes(digest[:8], "big") % 16 == 10
    assert (target(EIGHT, 16), target(ONE, 16), target("g0417:", 16), target("g0417:", 100)) == (8, 1, 7, 59)
    counts = np.bincount([target(f"g{i:04d}:", 16) for i in range(10_000)], minlength=17)[1:]
    assert counts.min() > 500 and counts.max() < 750  # ~625 each: every number is a target
    with pytest.raises(ValueError, match="not a guess_number prompt: '37\\+48='"):
        target("37+48=", 16)


def test_max_turns_leave_binary_search_room():
    assert [max_turns_for(h) for h in (2, 16, 17, 20, 100)] == [3, 6, 7, 7, 9]


@pytest.mark.parametrize(
    "transcript, gold",
    [
        ("10?", 1.0),  # solved at turn 1
        ("8? h;12? l;10?", 1 - 2 / 6),  # turn 3
        (" 8? h; 12? l; 10?", 1 - 2 / 6),  # a space before a guess is allowed
        ("8? h;12? l;9? h;11? l;3? h;4?", 0.0),  # six turns, never solved
        ("8? h;? e;17? e;0? e;10?", 1 - 4 / 6),  # malformed and out-of-range turns cost a turn each
        ("8? h;1e;10?", 0.0),  # "1e;10?" is one malformed turn: the replay needs " e;" and stops
        ("8? h;1e;10? e;10?", 1 - 2 / 6),  # ... as the env injects it: turn 3 hits
        # the policy writing reply-like text: a malformed turn (what the env answers " e;"), no credit
        ("8? h; h;12? e;10?", 1 - 2 / 6),
        ("8? h; l;10? e;", 0.0),
        ("8? l;10?", 0.0),  # a reply the game never gave (8 < 10 is " h;"): not this game's transcript
        ("8? h;10", 0.0),  # the last turn cut by the budget: no guess
        ("8? h;12? l;he;", 0.0),  # the last turn ended at EOS: no guess
        ("8? h;9? h;11? l;9? h;9? h;9? h;10?", 0.0),  # a hit at turn 7, past max_turns
        ("", 0.0),
    ],
)
def test_gold_replays_the_policys_guesses_by_hand(transcript, gold):
    assert GuessNumberGold(16)([TEN], [transcript]) == [pytest.approx(gold, abs=1e-12)]


def test_replay_reads_each_turns_guess():
    r = replay(TEN, "8? h;? e;17? e;10?", 16, 6)
    assert r.guesses == [8, None, None, 10] and r.solved_at == 4 and r.turns == 4
    r = replay(EIGHT, "8?", 16, 6)
    assert r.guesses == [8] and r.solved_at == 1


def test_the_games_replies():
    game = GuessNumber(16)
    state = game.start(TEN)
    assert state == {"target": 10}
    replies = {turn: game.respond(state, turn) for turn in ["8?", " 8?", "12?", "10?", "0?", "17?", "?", "h;9?", "9"]}
    assert {t: (r.text, r.done) for t, r in replies.items()} == {
        "8?": (" h;", False),
        " 8?": (" h;", False),
        "12?": (" l;", False),
        "10?": (None, True),  # a hit ends the episode
        "0?": (" e;", False),
        "17?": (" e;", False),
        "?": (" e;", False),
        "h;9?": (" e;", False),
        "9": (None, True),  # a turn that ended at EOS: the policy stopped
    }
    assert all(r.reward == 0.0 for r in replies.values()) and game.stop_strings == ("?",)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(CHARS)


def scripted_scores(tok, prompts: list[str], turns: list[list[str]], eos_after: set[int] = frozenset()):
    """Step a ``MultiTurnVectorEnv`` of the task with each row typing its ``turns`` (the game
    injects its replies in between); ``eos_after``: rows that then end with EOS. Returns each
    row's (score, completion, turns) and the env's ids of its episode."""
    task = make_guess_number_task(n_train=20, n_eval=10)
    ref, _ = build_tiny_model(tok, seed=0, n_positions=128)
    env = MultiTurnVectorEnv(
        tok, ref, task.gold_reward, prompts, num_envs=len(prompts), beta=0.0, max_new_tokens=task.max_new_tokens,
        **task.env_options(),
    )  # fmt: skip
    obs, _ = env.reset(seed=0, options={"prompts": prompts})
    queues = [tok("".join(t), add_special_tokens=False)["input_ids"] for t in turns]
    for r in eos_after:
        queues[r].append(tok.eos_token_id)
    out: dict[int, tuple] = {}
    while len(out) < len(prompts):
        action = [queues[r].pop(0) if queues[r] and r not in out else tok.eos_token_id for r in range(len(prompts))]
        obs, _, term, trunc, info = env.step({"token": np.array(action), "logprob": np.zeros(len(prompts), np.float32)})
        for r in np.flatnonzero(term | trunc):
            if r not in out:  # the final observation (autoreset comes on the next step)
                ids = obs["input_ids"][r, : obs["length"][r]].tolist()
                out[int(r)] = (float(info["score"][r]), str(info["completion"][r]), int(info["turns"][r]), ids)
    return [out[r] for r in range(len(prompts))]


def test_scripted_episodes_score_their_gold(tok):
    prompts = [EIGHT, TEN, TEN, TEN, ONE]
    turns = [
        ["8?"],  # a hit at once
        ["8?", "?", "12?", "10?"],  # a malformed turn on the way: turn 4
        ["8?", " h;12?", "10?"],  # imitating a reply is one malformed turn: turn 3
        ["1?", "2?", "3?", "4?", "5?", "6?", "10?"],  # cut after max_turns = 6 (the 7th never typed)
        ["8?", "4?", "3"],  # ends at EOS after a partial turn
    ]
    got = scripted_scores(tok, prompts, turns, eos_after={4})
    scores, completions, n_turns = [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]
    assert completions == [
        "8?",
        "8? h;? e;12? l;10?",
        "8? h; h;12? e;10?",
        "1? h;2? h;3? h;4? h;5? h;6?",
        "8? l;4? l;3",
    ]
    assert scores == pytest.approx([1.0, 1 - 3 / 6, 1 - 2 / 6, 0.0, 0.0], abs=1e-6)
    assert n_turns == [1, 4, 3, 6, 3]
    assert scores == pytest.approx(GuessNumberGold(16)(prompts, completions), abs=1e-6)  # the env's score is the gold


def test_sft_transcripts_are_the_envs_episodes_token_for_token(tok):
    """Typing an SFT transcript's policy turns into the env gives back the transcript and the
    ids SFT trained on: the char tokenizer tokenises the text exactly as the env built it."""
    task = make_guess_number_task(n_train=40, n_eval=10, seed=1)
    unsolved = [(p, c) for p, c in task.sft_data if replay(p, c, 16, 6).solved_at is None][:1]  # cut at turn 6
    pairs = [(p, c) for p, c in task.sft_data if " e;" in c][:2] + unsolved + task.sft_data[:2]
    assert len(pairs) == 5 and replay(*unsolved[0], 16, 6).turns == 6
    turns = []
    for _, c in pairs:
        cuts = [i + 1 for i, ch in enumerate(c) if ch == "?"]
        spans = [c[a:b] for a, b in zip([0, *cuts], cuts)]
        # the policy types each span less the reply it starts with: the game injects that
        turns.append([s[3:] if s[:3] in (" h;", " l;", " e;") else s for s in spans])
    got = scripted_scores(tok, [p for p, _ in pairs], turns)
    for (p, c), (score, completion, _, ids) in zip(pairs, got):
        assert completion == c and ids == tok(p + c, add_special_tokens=False)["input_ids"]
        assert score == pytest.approx(task.gold_reward([p], [c])[0], abs=1e-6)


def test_the_task_its_splits_and_its_players():
    task = get_task("guess_number")
    assert task.name == "guess_number" and task.max_turns == 6 and task.interaction is not None
    assert len(task.train_prompts) == 2000 and len(task.eval_prompts) == 200
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert isinstance(task.env_options()["interaction"], GuessNumber)
    # binary search (the demonstrations) on every train game: 1 − (k − 1)/6, k its depth in the search tree
    depth = {8: 1, 4: 2, 12: 2, 2: 3, 6: 3, 10: 3, 14: 3, 1: 4, 3: 4, 5: 4, 7: 4, 9: 4, 11: 4, 13: 4, 15: 4, 16: 5}
    want = [1 - (depth[target(p, 16)] - 1) / 6 for p in task.train_prompts]
    demos = task.demonstrations
    assert task.gold_reward([p for p, _ in demos], [c for _, c in demos]) == pytest.approx(want, abs=1e-12)
    # the SFT mixture: worse than binary search, malformed turns now and then
    gold = task.gold_reward([p for p, _ in task.sft_data], [c for _, c in task.sft_data])
    replays = [replay(p, c, 16, 6) for p, c in task.sft_data]
    malformed = sum(g is None for r in replays for g in r.guesses) / sum(r.turns for r in replays)
    assert 0.4 < statistics.mean(gold) < 0.52 < statistics.mean(want) and 0.04 < malformed < 0.08
    assert all(len(c) < task.max_new_tokens for _, c in task.sft_data)  # an SFT game fits the budget
    with pytest.raises(ValueError, match="high must be in 2..999"):
        make_guess_number_task(high=1)
    with pytest.raises(ValueError, match="n_train \\+ n_eval <= 10000"):
        make_guess_number_task(n_train=9900, n_eval=200)


def test_rlhf_list_shows_the_task(capsys):
    from rlhf_env.plugins import cli

    assert cli.main(["list", "tasks", "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert ["guess_number", "rlhf_env.builtins"] in [[t["name"], t["plugin"]] for t in desc["tasks"]]


# Random guesses ignoring the feedback, by hand: Σ_k (1/16)(15/16)^(k−1) (1 − (k−1)/6) = 0.1973.
UNIFORM_GUESSER = sum((1 / 16) * (15 / 16) ** (k - 1) * (1 - (k - 1) / 6) for k in range(1, 7))


def test_the_base_model_plays_the_format_well_short_of_binary_search(learning):
    """A small build (300 SFT steps; ~10 s on a free core). Sampled gold over 200 eval games,
    3 seeds: 0.283, 0.354, 0.313 on the machine that set these margins (untrained: 0.0)."""
    from rlhf_env.rollout import collect
    from rlhf_env.tasks.base_models import load_base_model

    task = make_guess_number_task(n_train=500, n_eval=200, sft_steps=300)
    model, tok = load_base_model(task, progress=False)
    untrained, _ = build_tiny_model(tok, seed=0, n_positions=128)
    assert evaluate(task, untrained, tok, n=64)["gold_mean"] < 0.05  # tasks.evaluate plays the game too
    env = MultiTurnVectorEnv(
        tok, model, task.gold_reward, task.eval_prompts, num_envs=200, beta=0.0,
        max_new_tokens=task.max_new_tokens, **task.env_options(),
    )  # fmt: skip
    golds, malformed, turns = [], [], []
    for seed in (100, 101, 102):
        batch = collect(env, model, seed, task.eval_prompts)
        assert batch.scores.tolist() == pytest.approx(task.gold_reward(batch.prompts, batch.completions), abs=1e-6)
        replays = [replay(p, c, 16, 6) for p, c in zip(batch.prompts, batch.completions)]
        golds.append(float(batch.scores.mean()))
        malformed.append(sum(g is None for r in replays for g in r.guesses) / sum(r.turns for r in replays))
        turns.append(statistics.mean(r.turns for r in replays))
    learning.check(min(golds), UNIFORM_GUESSER + 0.04, "base gold (worst of 3 sampling seeds)")
    assert max(golds) < 0.5  # far below 1 and below binary search's 0.604: room for RL
    assert max(malformed) < 0.2 and min(turns) > 3  # it plays the format, turn after turn
