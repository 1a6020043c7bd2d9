"""Multi-turn episodes: the env owns every token, injections are tokenised once, the reference's
cache goes on across turns, and the batch training scores is exactly what was sampled."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from tinyparts import assert_batch_exact, nudged_pair

from rlhf_env import Interaction, MultiTurnVectorEnv, Reply, build_char_tokenizer, build_tiny_model
from rlhf_env.errors import SettingError
from rlhf_env.interaction import CUT_MARKER
from rlhf_env.rollout import EpisodeStream, collect, first_episodes, to_batch
from rlhf_env.scoring import next_token_logprobs
from rlhf_env.turns import INJECTED, POLICY

CHARS = "abcdeklmnorstuy []:;"


class Echo(Interaction):
    """A turn ends at "a"; the reply names the turn's number; a turn ending otherwise (EOS) ends the episode."""

    stop_strings = ("a",)

    def start(self, prompt):
        return {"n": 0}

    def respond(self, state, turn):
        state["n"] += 1
        if not turn.endswith("a"):
            return Reply(done=True)
        return Reply(" ok" + "k" * state["n"] + " ", reward=0.5)


@pytest.fixture(scope="module")
def parts():
    return nudged_pair(CHARS)  # (tokenizer, reference, policy apart from it)


def make_env(parts, interaction=None, **kw):
    tok, ref, _ = parts
    options = dict(num_envs=6, group_size=2, max_new_tokens=40, beta=0.1, max_turns=4)
    options.update(kw)
    length = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    return MultiTurnVectorEnv(tok, ref, length, ["ab", "bcd", "e"], interaction=interaction or Echo(), **options)


def test_a_multi_turn_batch_is_exactly_what_the_sampler_and_reference_saw(parts):
    """The reference's log-probs (its cache continued across turns), the sampler's, the KL-shaped
    rewards and the injected spans: equal to plain full forwards over the final sequences."""
    tok, ref, policy = parts
    env = make_env(parts)
    batch = collect(env, policy, seed=3)
    m = batch.action_mask
    holes = ((m[:, 1:] - m[:, :-1]) == 1).sum(1) - 1  # policy spans after the first: after an injection
    assert int((holes > 0).sum()) >= 3  # rows did take several turns
    full_ref, full_pol = assert_batch_exact(batch, ref, policy)
    # rewards: −β KL on every policy token, 0.5 per answered turn, the score at the end; 0 off the mask
    kl = (full_pol - full_ref) * m
    turn_rewards = batch.rewards + 0.1 * kl
    assert float((batch.rewards * (1 - m)).abs().max()) == 0.0
    final = torch.tensor([float(len(c)) for c in batch.completions])  # the transcript's reward
    turns = (batch.scores - final) / 0.5  # the score holds the turns' rewards too ...
    torch.testing.assert_close(turn_rewards.sum(1), batch.scores)  # ... each on the token that earned it
    # every injection followed an answered turn; so may the last turn (cut by max_turns, no injection)
    assert all(abs(t - h) < 1e-3 or abs(t - h - 1) < 1e-3 for t, h in zip(turns.tolist(), holes.tolist()))
    # the injected ids are the reply's text, tokenised once, and decode back to it
    for r in range(len(batch.completions)):
        assert batch.completions[r].count(" ok") == int(holes[r])


def test_observation_source_and_info_name_every_injected_token(parts):
    tok, _, _ = parts
    env = make_env(parts, num_envs=2, group_size=1)
    obs, _ = env.reset(seed=0, options={"prompts": ["ab", "e"]})
    a = tok.convert_tokens_to_ids("a")
    obs, reward, term, trunc, info = env.step({"token": np.array([a, a]), "logprob": np.full(2, -1.0, np.float32)})
    injected = tok(" okk ", add_special_tokens=False)["input_ids"]
    assert [list(x) for x in info["injected"]] == [injected, injected] and info["_injected"].all()
    assert info["turn_reward"].tolist() == [0.5, 0.5]
    for r, p in enumerate((2, 1)):
        n = obs["length"][r]
        assert obs["input_ids"][r, p:n].tolist() == [a, *injected]
        assert obs["source"][r, :n].tolist() == [0] * p + [POLICY] + [INJECTED] * len(injected)
    assert env.observation_space.contains(obs) and not (term.any() or trunc.any())
    eos = tok.eos_token_id
    obs, reward, term, trunc, info = env.step({"token": np.array([eos, eos]), "logprob": np.full(2, -1.0, np.float32)})
    assert term.all() and info["turns"].tolist() == [2, 2] and info["interaction_errors"].tolist() == [0, 0]


class Broken(Interaction):
    """Every way a tool call goes wrong: a malformed call, an unknown tool, a tool that raises or hangs."""

    stop_strings = ("]",)
    timeout_s = 0.2

    def respond(self, state, turn):
        call = turn.rsplit("[", 1)[-1][:-1]
        if ":" not in call:
            return Reply(" [error: malformed] ")
        name, arg = call.split(":", 1)
        if name == "boom":
            raise RuntimeError("the tool broke")
        if name == "slow":
            time.sleep(1.0)
        if name != "ok":
            return Reply(f" [error: unknown tool {name}] ")
        return Reply(" done ")


@pytest.mark.parametrize(
    "call, says",
    [
        ("[x]", "malformed"),
        ("[k:1]", "unknown tool k"),
        ("[boom:1]", "RuntimeError: the tool broke"),
        ("[slow:1]", "timed out after 0.2 s"),
    ],
)
def test_a_bad_tool_call_becomes_a_message_the_policy_reads(parts, call, says):
    tok, _, _ = parts
    chars = "abcdeklmnorstuy[]:1"
    tok = build_char_tokenizer(chars + " RuntimeError:thebrokwdfs.02")
    ref, _ = build_tiny_model(tok, seed=1, n_positions=128)
    env = MultiTurnVectorEnv(
        tok, ref, lambda p, c: [0.0] * len(c), ["a"], num_envs=1, max_new_tokens=60, beta=0.0, interaction=Broken()
    )
    env.reset(seed=0)
    info = {}
    for t in tok(call, add_special_tokens=False)["input_ids"]:
        _, _, term, trunc, info = env.step({"token": np.array([t]), "logprob": np.zeros(1, np.float32)})
        assert not (term.any() or trunc.any())
    assert info["_injected"][0] and says in tok.decode(info["injected"][0])
    raised = "RuntimeError" in says or "timed out" in says
    assert bool(info.get("_interaction_error", [False])[0]) == raised  # failures are counted as such


def test_an_interaction_that_returns_no_reply_is_its_own_bug(parts):
    class Wrong(Interaction):
        stop_strings = ("a",)

        def respond(self, state, turn):
            return "ok"

    env = make_env(parts, Wrong(), num_envs=1, group_size=1)
    env.reset(seed=0)
    a = parts[0].convert_tokens_to_ids("a")
    with pytest.raises(TypeError, match="not a Reply"):
        env.step({"token": np.array([a]), "logprob": np.full(1, -1.0, np.float32)})


def test_limits_end_or_cut_an_episode(parts):
    tok, _, _ = parts
    a = tok.convert_tokens_to_ids("a")
    act = {"token": np.array([a]), "logprob": np.full(1, -1.0, np.float32)}
    env = make_env(parts, num_envs=1, group_size=1, max_turns=2)
    env.reset(seed=0)
    env.step(act)
    _, _, term, trunc, info = env.step(act)  # the second turn is the last
    assert trunc[0] and not term[0] and info["turns"][0] == 2

    class Long(Echo):
        def respond(self, state, turn):
            return Reply("k" * 50)

    env = make_env(parts, Long(), num_envs=1, group_size=1, max_injection_tokens=10)
    env.reset(seed=0)
    _, _, _, _, info = env.step(act)
    assert tok.decode(info["injected"][0]) == "k" * (10 - len(CUT_MARKER)) + CUT_MARKER  # cut, visibly
    env = make_env(parts, Long(), num_envs=1, group_size=1, max_new_tokens=20, max_injection_tokens=64)
    env.reset(seed=0)
    _, _, term, trunc, info = env.step(act)  # 50 tokens do not fit in the 19 left: the episode ends
    assert trunc[0] and not info["_injected"].any() and info["_turn_reward"][0]


def test_episodes_after_autoreset_are_exact_too(parts):
    """Several episodes per row (NEXT_STEP autoreset), each as exact as the first."""
    tok, ref, policy = parts
    from rlhf_env.generation import make_sampler

    env = make_env(parts, num_envs=2, group_size=1, max_new_tokens=24)
    sampler = make_sampler("kv_cache", policy, 2, pad_token_id=env.pad_token_id, vocab_size=env.vocab_size, seed=1)
    episodes = []
    for ep in EpisodeStream(env, sampler, 0):
        episodes.append(ep)
        if len(episodes) == 8:
            break
    assert {ep.row for ep in episodes} == {0, 1} and any(
        ep.source is not None and INJECTED in ep.source for ep in episodes
    )
    batch = to_batch(episodes, env.pad_token_id, env.vocab_size)
    assert_batch_exact(batch, ref, policy)
    # an episode's turns: its injections, and one more where its last turn ended (not cut by the budget)
    injections = [int(((ep.source[1:] == POLICY) & (ep.source[:-1] == INJECTED)).sum()) for ep in episodes]
    assert all(ep.turns - n in (0, 1) for ep, n in zip(episodes, injections))


def test_the_chunked_path_samples_a_turn_per_call_and_stays_exact(parts, monkeypatch):
    """With a sampler that continues its cache across turns, ``collect`` takes one ``step_chunk``
    per turn (not per token): the reference scores a turn in one forward, and the episodes are as
    exact as on the token path (and the ``chunk=1`` token path gives exact episodes too)."""
    tok, ref, policy = parts
    env = make_env(parts)
    calls = []
    real = env.step_chunk
    monkeypatch.setattr(env, "step_chunk", lambda action: calls.append(1) or real(action))
    batch = collect(env, policy, seed=3)
    m = batch.action_mask
    assert len(calls) < int(m.sum(1).max())  # fewer env calls than the longest episode's policy tokens
    assert_batch_exact(batch, ref, policy)
    holes = ((m[:, 1:] - m[:, :-1]) == 1).sum(1) - 1
    assert int((holes > 0).sum()) >= 3
    env = make_env(parts)  # the token path, on purpose
    sampler = make_sampler_for(env, policy)
    episodes = first_episodes(EpisodeStream(env, sampler, 0, chunk=1), env.num_envs)
    token_batch = to_batch(episodes, env.pad_token_id, env.vocab_size)
    mt = token_batch.action_mask
    full = next_token_logprobs(ref, token_batch.input_ids, token_batch.attention_mask, token_batch.vocab_size)
    torch.testing.assert_close(token_batch.ref_logprobs * mt, full * mt, atol=1e-4, rtol=0)


def make_sampler_for(env, policy):
    from rlhf_env.generation import make_sampler

    return make_sampler(
        "kv_cache", policy, env.num_envs, pad_token_id=env.pad_token_id, vocab_size=env.vocab_size, seed=1
    )


def test_gae_steps_over_an_injected_span_instead_of_restarting():
    """By hand, γ = 0.9, λ = 0.8, the hole at t = 2 (its value 9 and reward never seen):
    A3 = 2 − 0.1 = 1.9; A1 = 1 + 0.9·0.1 − 0.2 + 0.72·1.9 = 2.258; A0 = 0.9·0.2 − 0.5 + 0.72·2.258 = 1.30576."""
    from rlhf_env.algorithms.maths import gae

    rewards = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[1.30576, 2.258, 0.0, 1.9]]))
    torch.testing.assert_close(ret, torch.tensor([[1.80576, 2.458, 0.0, 2.0]]))


def test_packed_scoring_skips_the_holes_of_a_multi_turn_batch(parts):
    from rlhf_env.packing import packed_logprobs

    tok, ref, policy = parts
    batch = collect(make_env(parts), policy, seed=3)
    want = next_token_logprobs(policy, batch.input_ids, batch.attention_mask, batch.vocab_size) * batch.action_mask
    got = packed_logprobs(policy, batch.input_ids, batch.attention_mask, batch.action_mask, batch.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "algo, config",
    [
        ("grpo", {"num_prompts": 3, "group_size": 2, "num_minibatches": 2}),
        ("dr_grpo", {"num_prompts": 3, "group_size": 2, "num_minibatches": 2}),
        ("gspo", {"num_prompts": 3, "group_size": 2, "num_minibatches": 2}),
        ("cispo", {"num_prompts": 3, "group_size": 2, "num_minibatches": 2}),
        ("dapo", {"num_prompts": 3, "group_size": 2, "num_minibatches": 2}),
        ("rloo", {"num_prompts": 3, "k": 2}),
        ("reinforce_pp", {"num_prompts": 6, "num_minibatches": 1}),
        ("reinforce", {"num_envs": 6}),
        ("ppo", {"num_envs": 6, "num_minibatches": 2}),
        ("online_dpo", {"num_prompts": 3}),
    ],
)
def test_every_online_trainer_steps_on_multi_turn_batches(parts, algo, config):
    """A task with an interaction gives the trainers multi-turn envs; they train on the policy's
    tokens only (``perf/tokens`` counts those), and the first ratio is 1: training recomputes
    the sampler's log-probs (no re-tokenisation drift)."""
    import dataclasses

    from rlhf_env import plugins
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.tasks.base import Task

    tok, ref, _ = parts
    task = Task(
        "echo",
        ["ab", "bcd"],
        ["e"],
        lambda p, c: [float(len(x)) for x in c],
        [("ab", "c")],
        max_new_tokens=24,
        interaction=Echo,
        max_turns=3,
    )
    spec = plugins.get_host().algorithms.get(algo)
    ctx = TrainContext(task, copy.deepcopy(ref).eval(), ref, tok, torch.device("cpu"))
    assert isinstance(ctx.env(2), MultiTurnVectorEnv)
    cfg = spec.make_config(**config)
    if "ppo_epochs" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, ppo_epochs=1)
    torch.manual_seed(0)
    metrics = spec.Trainer(ctx, cfg).step(0, 5)
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["perf/tokens"] > 0
    if "objective/kl" in metrics:  # policy = reference at step 0: the env's KL, turn after turn, is 0
        assert abs(metrics["objective/kl"]) < 1e-4


def test_max_turn_tokens_ends_a_turn_by_its_length(parts):
    tok, _, _ = parts

    class Short(Echo):
        stop_strings = ()
        max_turn_tokens = 3

        def respond(self, state, turn):
            state["n"] += 1
            return Reply(" ok ")

    env = make_env(parts, Short(), num_envs=1, group_size=1)
    env.reset(seed=0)
    b = tok.convert_tokens_to_ids("b")
    act = {"token": np.array([b]), "logprob": np.full(1, -1.0, np.float32)}
    got = [bool(env.step(act)[4].get("_injected", [False])[0]) for _ in range(7)]
    assert got == [False, False, True, False, False, True, False]  # every third policy token ends a turn


def test_evaluation_reports_turns_and_tool_use_of_a_tool_task():
    from rlhf_env.algorithms.base import TrainContext
    from rlhf_env.algorithms.run.loop import evaluate_policy
    from rlhf_env.tasks import get_task
    from rlhf_env.tasks.base_models import load_base_model

    task = get_task("calculator")  # its shipped base model
    ref, tok = load_base_model(task, device="cpu", progress=False)
    out = evaluate_policy(TrainContext(task, ref, ref, tok, torch.device("cpu")), 40)
    assert 1.0 < out["episode/turns"] <= task.max_turns  # most episodes call the tool, then answer
    assert 0.3 < out["tool/call_rate"] <= 1.0 and 0.0 < out["tool/call_accuracy"] < 1.0
    assert 0.15 < out["reward/gold"] < 0.8 and abs(out["objective/kl_eval"]) < 1e-4


def test_bad_turn_settings_are_named(parts):
    with pytest.raises(TypeError, match="interaction must be an rlhf_env.Interaction, got str"):
        make_env(parts, "calc")
    with pytest.raises(SettingError, match="max_turns and max_injection_tokens must be >= 1, got 0 and 64"):
        make_env(parts, max_turns=0)
