"""Bad input gets a clear exception that names the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tinyparts import count_e, tiny_pair

from rlhf_env import EpisodeEndedError, InvalidActionError, TextGenEnv, VectorTextGenEnv, VocabMismatchError
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model


@pytest.fixture
def env():
    _, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, ["Hello"], beta=0.1, max_new_tokens=2, device="cpu")
    env.reset(seed=0)
    return env


def test_token_outside_vocabulary(env):
    with pytest.raises(InvalidActionError, match=r"token 500 .*outside the vocabulary \[0, 98\)"):
        env.step({"token": 500, "logprob": -1.0})
    with pytest.raises(InvalidActionError, match="token -1"):
        env.step({"token": -1, "logprob": -1.0})


def test_token_outside_vocabulary_names_the_vector_row():
    _, ref, tok = tiny_pair()
    venv = VectorTextGenEnv(tok, ref, count_e, ["Hello"], num_envs=3, beta=0.0, device="cpu")
    venv.reset(seed=0)
    with pytest.raises(InvalidActionError, match=r"token 99 \(env 2\)"):
        venv.step(np.array([5, 6, 99]))


def test_step_after_episode_ended(env):
    env.step({"token": 5, "logprob": -1.0})
    env.step({"token": 5, "logprob": -1.0})  # truncated at max_new_tokens=2
    with pytest.raises(EpisodeEndedError, match="episode has ended"):
        env.step({"token": 5, "logprob": -1.0})


def test_step_before_reset():
    _, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, ["Hello"], device="cpu")
    with pytest.raises(EpisodeEndedError, match="reset"):
        env.step({"token": 5, "logprob": -1.0})


@pytest.mark.parametrize("bad", [math.nan, 0.5, -math.inf])
def test_nan_positive_or_infinite_logprob(env, bad):
    with pytest.raises(InvalidActionError, match="not a log-probability"):
        env.step({"token": 5, "logprob": bad})


def test_beta_positive_without_logprob(env):
    with pytest.raises(InvalidActionError, match=r"beta=0.1 > 0 needs the acting policy's log-prob"):
        env.step(5)


def test_tokenizer_that_does_not_fit_the_model():
    small_model, _ = build_tiny_model(build_char_tokenizer("abc"))
    big_tok = build_char_tokenizer()
    with pytest.raises(VocabMismatchError, match=r"tokenizer has 98 tokens but the reference model embeds only 6"):
        TextGenEnv(big_tok, small_model, count_e, ["abc"], device="cpu")


def test_empty_prompt_source():
    _, ref, tok = tiny_pair()
    with pytest.raises(ValueError, match="prompt source is empty"):
        TextGenEnv(tok, ref, count_e, [], device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -0.1}, "beta .* must be >= 0"),
        ({"beta": 0.1, "ref_model": None}, "needs a reference model"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"max_prompt_tokens": 2}, "more than max_prompt_tokens=2"),
        ({"max_new_tokens": 1000}, "exceeds the reference model's 256 positions"),
    ],
)
def test_impossible_configuration(kwargs, message):
    _, ref, tok = tiny_pair()
    args = {"ref_model": ref, "beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        TextGenEnv(tok, args.pop("ref_model"), count_e, ["Hello"], device="cpu", **args)


def test_reward_returning_nan_or_wrong_count_is_named():
    _, ref, tok = tiny_pair()
    for reward, message in [(lambda p, c: [math.nan] * len(c), "non-finite"), (lambda p, c: [], "0 scores for 1")]:
        env = TextGenEnv(tok, ref, reward, ["Hi"], beta=0.0, max_new_tokens=1, device="cpu")
        env.reset(seed=0)
        with pytest.raises(ValueError, match=message):
            env.step(5)


def test_missing_local_model_path_is_not_downloaded(tmp_path):
    _, _, tok = tiny_pair()
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        TextGenEnv(tok, str(tmp_path / "no-such-model"), count_e, ["Hi"], device="cpu")


def test_step_and_step_chunk_after_close_are_refused():
    # issue 20 §3f: a closed env used to go on silently.
    from rlhf_env.errors import EnvStateError

    _, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, ["Hello"], beta=0.0, device="cpu")
    env.reset(seed=0)
    env.close()
    with pytest.raises(EnvStateError, match=r"^step\(\) called after close\(\); make a new env$"):
        env.step(5)
    with pytest.raises(EnvStateError, match=r"^reset\(\) called after close\(\)"):
        env.reset(seed=0)
    venv = VectorTextGenEnv(tok, ref, count_e, ["Hello"], num_envs=2, beta=0.0, device="cpu")
    venv.reset(seed=0)
    venv.close()
    with pytest.raises(EnvStateError, match=r"^step\(\) called after close\(\)"):
        venv.step(np.array([5, 6]))
    with pytest.raises(EnvStateError, match=r"^step_chunk\(\) called after close\(\)"):
        venv.step_chunk(np.array([[5, 6], [6, 5]]))


def test_unknown_reset_options_name_the_key_and_the_known_ones():
    from rlhf_env.errors import SettingError

    _, ref, tok = tiny_pair()
    env = TextGenEnv(tok, ref, count_e, ["Hello"], beta=0.0, device="cpu")
    with pytest.raises(
        SettingError, match=r"^reset\(\) got unknown option\(s\) \['promt'\]; this env knows \['prompt'\]$"
    ):
        env.reset(seed=0, options={"promt": "Hi"})
    venv = VectorTextGenEnv(tok, ref, count_e, ["Hello"], num_envs=2, beta=0.0, device="cpu")
    with pytest.raises(SettingError, match=r"unknown option\(s\) \['prompt'\]; this env knows \['prompts'\]$"):
        venv.reset(seed=0, options={"prompt": "Hi"})
    assert env.reset(seed=0, options={"prompt": "Hi"})[1]["prompt"] == "Hi"  # a known key still works
