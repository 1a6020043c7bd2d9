"""Gymnasium contract: registered ids, spaces, seeding, autoreset, groups, rendering."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode
from tinyparts import count_e, tiny_pair

import rlhf_env
from rlhf_env import TextGenEnv, VectorTextGenEnv
from rlhf_env.policy import SamplingPolicy


@pytest.mark.parametrize("env_id", rlhf_env.ENV_IDS)
def test_every_registered_id_passes_check_env(env_id):
    env = gymnasium.make(env_id, render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings are failures here
        check_env(env.unwrapped)


@pytest.mark.parametrize("env_id", rlhf_env.ENV_IDS)
def test_every_registered_id_has_a_working_vector_entry_point(env_id):
    venv = gymnasium.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(venv.unwrapped, VectorTextGenEnv)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = venv.reset(seed=0)
    assert obs in venv.observation_space
    for _ in range(3):
        obs, rew, term, trunc, info = venv.step(venv.action_space.sample())
        assert obs in venv.observation_space and rew.shape == (3,) and rew.dtype == np.float32


def test_default_env_runs_offline_with_no_arguments():
    env = gymnasium.make("rlhf_env/TextGen-v0")
    obs, info = env.reset(seed=0)
    assert info["prompt"] in rlhf_env.prompts.DEFAULT_PROMPTS
    assert obs["length"] == obs["prompt_length"] > 0


def test_seeded_reset_is_deterministic_and_seeds_differ():
    _, ref, tok = tiny_pair()
    prompts = [f"prompt number {i}" for i in range(50)]
    env = TextGenEnv(tok, ref, count_e, prompts, device="cpu")
    first = [env.reset(seed=s)[1]["prompt"] for s in (1, 2, 3)]
    again = [env.reset(seed=s)[1]["prompt"] for s in (1, 2, 3)]
    assert first == again and len(set(first)) > 1


def test_episode_terminates_on_eos_and_truncates_at_limit():
    _, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, ["Hi"], beta=0.0, max_new_tokens=3, device="cpu")
    env.reset(seed=0)
    a = tok.convert_tokens_to_ids("a")
    assert env.step(a)[2:4] == (False, False)
    _, _, terminated, truncated, info = env.step(tok.eos_token_id)
    assert (terminated, truncated) == (True, False) and info["completion"] == "a"
    env.reset(seed=0)
    results = [env.step(a)[2:4] for _ in range(3)]
    assert results == [(False, False), (False, False), (False, True)]


def test_render_ansi_shows_prompt_and_completion():
    _, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, ["Once"], beta=0.0, render_mode="ansi", device="cpu")
    env.reset(seed=0)
    for ch in " up":
        env.step(tok.convert_tokens_to_ids(ch))
    assert env.render() == "Once\u2502 up"


def test_beta_zero_without_reference_model_gives_only_the_score():
    _, _, tok = tiny_pair()
    env = TextGenEnv(tok, None, count_e, ["x"], beta=0.0, max_new_tokens=2, device="cpu")
    env.reset(seed=0)
    e = tok.convert_tokens_to_ids("e")
    _, r0, *_, info0 = env.step(e)
    _, r1, *_, info1 = env.step(e)
    assert r0 == 0.0 and "kl" not in info0 and "ref_logprob" not in info0
    assert r1 == pytest.approx(0.1 * 2 - 0.05 * 2)


def test_vector_groups_share_prompts_even_when_rows_end_at_different_steps():
    _, ref, tok = tiny_pair()
    prompts = [f"p{i}" for i in range(40)]
    G, B = 3, 6
    env = VectorTextGenEnv(
        tok, ref, count_e, prompts, num_envs=B, group_size=G, beta=0.0, max_new_tokens=4, device="cpu"
    )
    obs, info = env.reset(seed=5)
    assert len(set(info["prompt"][:G])) == 1 and len(set(info["prompt"][G:])) == 1
    a, eos = tok.convert_tokens_to_ids("a"), tok.eos_token_id
    episode_prompts = {r: [env.core.prompt_text[r]] for r in range(B)}
    ended = np.zeros(B, bool)
    for _ in range(14):
        # row r ends its episodes early (EOS at its step r % G), the others run to the limit
        tokens = np.array([eos if (obs["length"][r] - obs["prompt_length"][r]) == r % G else a for r in range(B)])
        obs, _, term, trunc, _ = env.step(tokens)
        for r in np.flatnonzero(ended):
            episode_prompts[r].append(env.core.prompt_text[r])
        ended = term | trunc
    for g in range(B // G):
        rows = range(g * G, (g + 1) * G)
        k = min(len(episode_prompts[r]) for r in rows)
        assert k >= 3
        for i in range(k):  # the i-th episode of every row in a group has the same prompt
            assert len({episode_prompts[r][i] for r in rows}) == 1
    assert max(len(q) for q in env._queues) <= 8  # finished prompts are dropped


def test_sampling_policy_equal_to_reference_has_zero_kl():
    _, ref, tok = tiny_pair()
    env = VectorTextGenEnv(
        tok, ref, count_e, ["The cat", "Hello there"], num_envs=4, beta=0.1, max_new_tokens=6, device="cpu"
    )
    agent = SamplingPolicy(ref, 4, tok.pad_token_id, seed=0)
    obs, _ = env.reset(seed=0)
    kls = []
    for _ in range(15):
        obs, _, _, _, info = env.step(agent.act(obs))
        kls.extend(info["kl"][info["_kl"]])
    assert len(kls) > 40 and np.abs(kls).max() < 1e-5


def test_vector_env_validates_sizes():
    _, ref, tok = tiny_pair()
    with pytest.raises(ValueError, match="multiple of group_size"):
        VectorTextGenEnv(tok, ref, count_e, ["a"], num_envs=5, group_size=2, device="cpu")
    env = VectorTextGenEnv(tok, ref, count_e, ["a"], num_envs=2, beta=0.0, device="cpu")
    with pytest.raises(ValueError, match="2 prompts"):
        env.reset(options={"prompts": ["x"]})
    env.reset(seed=0)
    with pytest.raises(rlhf_env.InvalidActionError, match="expected 2"):
        env.step(np.array([3, 4, 5]))
