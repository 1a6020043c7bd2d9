"""The one rollout path: through wrappers, with the env's public API, and with a plugin's generator."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from rlhf_env import build_char_tokenizer, build_tiny_model, plugins
from rlhf_env.algorithms.base import TrainContext
from rlhf_env.algorithms.run.loop import evaluate_policy
from rlhf_env.default import make_default_vector_env
from rlhf_env.rollout import collect, env_attr, set_env_attr
from rlhf_env.seeding import derive
from rlhf_env.tasks import evaluate, get_task

CONST_GENERATOR = """
import numpy as np
from rlhf_env import hookimpl

BUILT = []

class Const:
    \"\"\"Always the same token, with log-prob 0 (a point mass).\"\"\"

    def __init__(self, model, batch_size, *, pad_token_id, vocab_size, seed, temperature=1.0, greedy=False):
        BUILT.append({"batch_size": batch_size, "pad_token_id": pad_token_id, "vocab_size": vocab_size, "seed": seed})
        self.batch_size = batch_size

    def act(self, obs):
        return {"token": np.full(self.batch_size, 5, dtype=np.int64), "logprob": np.zeros(self.batch_size, np.float32)}

@hookimpl
def rlhf_register_generators(register):
    register("const5", Const)
"""


def test_a_plugin_generator_is_used_by_the_rollout_path(plugin_path, write_dist):
    write_dist(plugin_path, "rlhf_demo_gen", {"gen": "rlhf_demo_gen"}, {"rlhf_demo_gen": CONST_GENERATOR})
    assert ("const5", "gen") in {(e["name"], e["plugin"]) for e in plugins.get_host().describe()["generators"]}
    env = make_default_vector_env(num_envs=3, max_new_tokens=4, beta=0.0)
    model = env.ref_model
    batch = collect(env, model, seed=7, generator="const5")
    import rlhf_demo_gen

    assert rlhf_demo_gen.BUILT == [
        {"batch_size": 3, "pad_token_id": env.pad_token_id, "vocab_size": env.vocab_size, "seed": derive(7, "sampler")}
    ]
    token5 = env.tokenizer.decode([5])
    assert batch.completions == [token5 * 4] * 3  # never EOS: every episode is truncated at 4 tokens
    assert batch.num_tokens == 12 and float(batch.logprobs.abs().sum()) == 0.0
    with pytest.raises(Exception, match="kv_cache"):  # an unknown name lists the registered ones
        collect(env, model, seed=7, generator="no_such_backend")


def test_collect_through_a_gymnasium_wrapper_equals_the_bare_env():
    bare = make_default_vector_env(num_envs=4, max_new_tokens=6, beta=0.1)
    wrapped = RecordEpisodeStatistics(make_default_vector_env(num_envs=4, max_new_tokens=6, beta=0.1))
    assert env_attr(wrapped, "max_new_tokens") == 6 and env_attr(wrapped, "vocab_size") == bare.vocab_size
    policy = copy.deepcopy(bare.ref_model)
    a, b = collect(bare, policy, seed=3), collect(wrapped, policy, seed=3)
    # The bare env takes the chunked path (whole completions), the wrapper one step per token:
    # the same samples, and the same rewards up to float rounding.
    assert a.completions == b.completions and torch.equal(a.scores, b.scores)
    torch.testing.assert_close(a.rewards, b.rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert wrapped.episode_count >= 4 and len(wrapped.return_queue) == wrapped.episode_count  # it saw every end
    set_env_attr(wrapped, "beta", 0.3)  # what adaptive KL does between rollouts
    assert env_attr(wrapped, "beta") == 0.3 and wrapped.unwrapped.beta == 0.3
    with pytest.raises(ValueError, match="beta"):
        set_env_attr(wrapped, "beta", -1.0)


def test_vector_info_has_prompt_and_completion_when_an_episode_ends():
    env = make_default_vector_env(num_envs=3, max_new_tokens=3, beta=0.0)
    _, info = env.reset(seed=0)
    prompts = list(info["prompt"])
    actions = {"token": np.array([5, 6, 7]), "logprob": np.zeros(3, np.float32)}
    for _ in range(2):
        _, _, term, trunc, info = env.step(actions)
        assert "prompt" not in info and not (term | trunc).any()
    _, _, term, trunc, info = env.step(actions)
    assert trunc.all() and info["_prompt"].all() and info["_completion"].all()
    assert list(info["prompt"]) == prompts
    assert list(info["completion"]) == [env.tokenizer.decode([t] * 3) for t in (5, 6, 7)]


def test_base_model_gold_is_one_number():
    """``rlhf base-model`` (tasks.evaluate) and the bench's base row (evaluate_policy) agree for the same n."""
    task = get_task("arithmetic")
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=3)
    ours = evaluate(task, model, tok, n=8)
    bench = evaluate_policy(TrainContext(task, copy.deepcopy(model), model, tok, torch.device("cpu")), 8)
    assert ours["n"] == 8 and abs(ours["kl_mean"]) < 1e-5  # the model against itself (float rounding)
    assert ours["gold_mean"] == bench["reward/gold"]


def test_ppo_trains_through_a_wrapped_env():
    """Adaptive KL sets β through the wrapper; the updates are those of the bare env."""
    from rlhf_env.algorithms.zoo import ppo
    from rlhf_env.tasks.arithmetic import make_arithmetic_task
    from rlhf_env.tasks.base_models import load_base_model

    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    ref, tokenizer = load_base_model(task, device="cpu")
    config = ppo.Config(num_envs=4, num_minibatches=2, ppo_epochs=1, adaptive_kl=True, kl_coef=0.1, target_kl=0.01)
    trainers = [
        ppo.Trainer(TrainContext(task, copy.deepcopy(ref).eval(), ref, tokenizer, torch.device("cpu")), config)
        for _ in range(2)
    ]
    trainers[1].env = RecordEpisodeStatistics(trainers[1].env)
    runs = []
    for trainer in trainers:
        torch.manual_seed(0)
        runs.append([trainer.step(step, 100 + step) for step in range(2)])
    # bare: chunked path; wrapped: token path. The rollouts agree to float rounding (~1e-7 in the KL
    # rewards); Adam's first steps turn such differences in near-zero gradients into lr-sized moves,
    # so the losses agree only loosely.
    rollout = ("reward/score", "objective/kl", "objective/return", "perf/tokens", "objective/kl_coef")
    (bare, _), (wrapped, later) = runs
    assert {k: pytest.approx(bare[k], abs=1e-5) for k in rollout} == {k: wrapped[k] for k in rollout}
    assert pytest.approx(bare, rel=2e-2, abs=1e-3) == wrapped
    assert runs[0][1]["objective/kl_coef"] == pytest.approx(later["objective/kl_coef"], rel=1e-4)  # β from step 0
    assert runs[1][1]["objective/kl_coef"] != pytest.approx(0.1)  # β moved, and was used
    assert trainers[1].env.episode_count >= 8 and env_attr(trainers[1].env, "beta") == runs[1][1]["objective/kl_coef"]
