"""CUDA paths: the sampler (eager and CUDA-graph decode), multi-token steps, a training run, and a
base model built on the GPU. Skipped without CUDA; run on a GPU machine by benchmarks/gpu_run.sh."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rlhf_env.default import make_default_vector_env
from rlhf_env.fastgen import sample_completions
from rlhf_env.rollout import collect
from rlhf_env.scoring import next_token_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """Full float32 matmuls (no TF32), so CUDA log-probs can be compared at 1e-4."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def sample(model, ids, lengths, K, graph, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return sample_completions(
        model,
        ids,
        lengths,
        K,
        pad_token_id=0,
        eos_token_id=model.generation_config.eos_token_id,
        vocab_size=model.config.vocab_size,
        generator=gen,
        cuda_graph=graph,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_gives_the_eager_samples(dtype):
    env = make_default_vector_env(num_envs=2, max_new_tokens=4)
    model = copy.deepcopy(env.ref_model).to("cuda", dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (6, 9), generator=gen).cuda()
    lengths = torch.tensor([9, 3, 5, 9, 1, 7], device="cuda")  # ragged histories
    eager, graphed = (sample(model, ids, lengths, 12, graph) for graph in (False, True))
    assert torch.equal(eager[0], graphed[0]) and torch.equal(eager[2], graphed[2])
    torch.testing.assert_close(eager[1], graphed[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("generator", ["kv_cache", "kv_cache_graph"])
def test_cuda_sampler_logprobs_equal_a_full_forward(generator):
    env = make_default_vector_env(num_envs=4, max_new_tokens=8, beta=0.1, device="cuda")
    policy = copy.deepcopy(env.ref_model)
    assert next(policy.parameters()).device.type == "cuda"
    batch = collect(env, policy, seed=1, device=torch.device("cuda"), generator=generator)
    full = next_token_logprobs(policy, batch.input_ids, batch.attention_mask, batch.vocab_size).detach()
    assert batch.input_ids.device.type == "cuda" and batch.num_tokens >= 4
    torch.testing.assert_close(batch.logprobs * batch.action_mask, full * batch.action_mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.ref_logprobs, batch.logprobs, atol=1e-4, rtol=0)


def test_training_runs_on_cuda_through_the_cli(tmp_path, capsys):
    from rlhf_env.plugins import cli

    out = tmp_path / "run"
    argv = ["train", "--algo", "grpo", "--task", "arithmetic", "--out", str(out), "--steps", "2", "--device", "cuda"]
    assert cli.main([*argv, "--eval-every", "2", "--set", "num_prompts=4", "--set", "group_size=4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(
        torch.isfinite(torch.tensor(float(v))) for r in records for v in r.values() if isinstance(v, float)
    )


def test_a_base_model_is_built_on_the_gpu(monkeypatch, tmp_path):
    from rlhf_env.tasks import get_task
    from rlhf_env.tasks.base_models import load_base_model

    monkeypatch.setenv("RLHF_ENV_CACHE", str(tmp_path))
    task = get_task("arithmetic", digits=1, n_train=60, n_eval=10, sft_steps=30)
    model, _ = load_base_model(task, device="cuda", progress=False)
    (path,) = (tmp_path / "base_models").iterdir()
    info = json.loads((path / "build_info.json").read_text())
    assert info["device"].startswith("cuda") and next(model.parameters()).device.type == "cuda"
