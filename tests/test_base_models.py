"""Base models: the SFT loss by hand, a build that learns, caching, and --model replacing it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tinyparts import next_logprobs

from rlhf_env.scoring import sft_loss
from rlhf_env.tasks import evaluate, make_task_env
from rlhf_env.tasks.arithmetic import make_arithmetic_task
from rlhf_env.tasks.base_models import base_model_dir, build_base_model, load_base_model
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model, save_tiny


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sft_loss_is_the_completion_nll_by_hand():
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+="), seed=2)
    pairs = [("12+3=", "15"), ("1+1=", "2")]
    by_hand, count = 0.0, 0
    for prompt, completion in pairs:
        ids = tok(prompt)["input_ids"]
        for y in tok(completion)["input_ids"] + [tok.eos_token_id]:  # prompt tokens do not count
            by_hand -= float(next_logprobs(model, ids)[y])
            ids.append(y)
            count += 1
    with torch.no_grad():
        assert float(sft_loss(model, tok, pairs)) == pytest.approx(by_hand / count, abs=1e-5)


def test_base_model_is_built_once_cached_and_learns(cache, learning):
    task = make_arithmetic_task(digits=1, n_train=60, n_eval=20, sft_steps=150)
    path = build_base_model(task, progress=False)
    assert path == base_model_dir(task) and path.parent == cache / "base_models"
    info = json.loads((path / "build_info.json").read_text())
    assert info["task"] == "arithmetic" and info["recipe"]["sft_steps"] == 150
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_base_model(task, progress=False) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    model, tok = load_base_model(task)
    untrained, _ = build_tiny_model(tok, seed=0)
    seen = dataclasses.replace(task, eval_prompts=task.train_prompts)  # 60 examples: memorised, not general
    trained_acc = evaluate(seen, model, tok, greedy=True)["gold_mean"]
    untrained_acc = evaluate(seen, untrained, tok, greedy=True)["gold_mean"]
    learning.check(trained_acc, untrained_acc + 0.3, "greedy gold")  # the recipe is seeded: the same on every seed
    with torch.no_grad():
        assert float(sft_loss(model, tok, task.sft_data)) < 0.5 * float(sft_loss(untrained, tok, task.sft_data))


def test_model_path_replaces_the_base_model_everywhere(cache, tmp_path):
    task = make_arithmetic_task(digits=1, n_train=60, n_eval=20)
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=7)
    path = save_tiny(model, tok, tmp_path / "mine")
    env = make_task_env(task, path, beta=0.1, device="cpu")
    obs, info = env.reset(seed=0)
    assert info["prompt"] in task.train_prompts
    ids = obs["input_ids"][: obs["prompt_length"]].tolist()
    lp = next_logprobs(model, ids)
    *_, step_info = env.step({"token": 5, "logprob": float(lp[5])})
    assert step_info["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is our checkpoint
    assert not (cache / "base_models").exists()  # nothing was built


def test_base_model_build_is_reproducible_for_a_seed(cache):
    from safetensors.torch import load_file

    task = make_arithmetic_task(digits=1, n_train=40, n_eval=10, sft_steps=20)
    first = load_file(build_base_model(task, progress=False) / "model.safetensors")
    second = load_file(build_base_model(task, force=True, progress=False) / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["arithmetic", "sentiment", "guess_number"])
def test_default_tasks_start_from_the_shipped_base_model_without_building(name, cache):
    from rlhf_env.tasks import get_task
    from rlhf_env.tasks.base_models import SHIPPED, shipped_base_model

    task = get_task(name)
    path = build_base_model(task, progress=False)
    assert path == SHIPPED / task.cache_key() == shipped_base_model(task)  # a recipe change must re-ship it
    assert not cache.exists()  # nothing was built or written
    info = json.loads((path / "build_info.json").read_text())
    assert info["task"] == name and info["config"] == task.config
    model, tok = load_base_model(task)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_a_forced_build_goes_to_the_cache_and_then_takes_precedence(cache, monkeypatch):
    from rlhf_env.tasks.base_models import shipped_base_model

    task = make_arithmetic_task(digits=1, n_train=40, n_eval=10, sft_steps=2)
    monkeypatch.setattr("rlhf_env.tasks.base_models.SHIPPED", cache / "shipped")
    build_base_model(task, progress=False)
    shipped = cache / "shipped" / task.cache_key()
    shipped.parent.mkdir()
    base_model_dir(task).rename(shipped)  # pretend this build was shipped
    assert shipped_base_model(task) == shipped and build_base_model(task, progress=False) == shipped
    assert build_base_model(task, force=True, progress=False) == base_model_dir(task)
    assert build_base_model(task, progress=False) == base_model_dir(task)


def test_the_quick_suite_and_learning_tests_task_has_a_shipped_base_model():
    """Its base model is shipped so learning tests and the quick suite start alike on every CPU."""
    from rlhf_env.tasks.base_models import shipped_base_model

    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    assert shipped_base_model(task) is not None  # a changed recipe must re-ship it
