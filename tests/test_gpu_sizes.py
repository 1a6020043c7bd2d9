"""GPU-sized base models (``model_size="gpu"``) and the GPU figures' arithmetic, checked on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_env.bench import gpu_figures
from rlhf_env.bench.suite import load_suite
from rlhf_env.tasks import get_task
from rlhf_env.tasks.base_models import shipped_base_model


@pytest.mark.parametrize("name", ["sentiment", "arithmetic"])
def test_gpu_size_is_tens_of_millions_and_leaves_the_shipped_models_alone(name):
    tiny, gpu = get_task(name), get_task(name, model_size="gpu")
    assert shipped_base_model(tiny) is not None  # the tiny default's cache key did not move
    assert gpu.cache_key() != tiny.cache_key() and shipped_base_model(gpu) is None
    r = gpu.recipe
    # GPT-2 weights by hand: per layer 12 d² + 13 d, plus token and position tables and the final norm.
    params = r.n_layer * (12 * r.n_embd**2 + 13 * r.n_embd) + (100 + r.n_positions + 2) * r.n_embd
    assert (r.n_layer, r.n_embd) == (8, 512) and 25e6 < params < 26e6
    with pytest.raises(ValueError, match="model_size must be one of tiny, gpu, got 'huge'"):
        get_task(name, model_size="huge")


def test_the_gpu_suite_runs_the_gpu_sized_tasks_on_cuda():
    suite = load_suite("gpu")
    assert suite.device == "cuda" and {t.knobs.get("model_size") for t in suite.tasks} == {"gpu"}


def test_update_flops_and_decode_floor_by_hand():
    cpu = torch.device("cpu")
    u = gpu_figures.update_figures("toy", cpu, B=2, T=8, peak=1.0, repeats=1, warmup=0)
    # toy: d = 64, L = 2, V = 96; N = V d + L (12 d² + 13 d) + 2 d = 6144 + 99968 + 128
    N = 106240
    assert u["params_m"] * 1e6 == N
    flops = (6 * N + 12 * 2 * 64 * 8) * 2 * 8
    assert u["tflops"] * u["seconds"] * 1e12 == pytest.approx(flops)
    assert u["mfu"] == pytest.approx(u["tflops"])  # against a peak of 1 TFLOP/s
    d = gpu_figures.decode_figures("toy", cpu, B=2, P=3, K=4, bandwidth=1e9, repeats=1, warmup=0)
    floor = 4 * 4 * (N + 2 * 2 * 64 * 2 * (3 + 2)) / 1e9  # K steps of float32 weights and the mean cache
    assert d["of_floor"] * d["seconds"] == pytest.approx(floor)
    assert d["tokens_per_s"] * d["seconds"] == pytest.approx(8)


def test_gpu_figures_prints_one_json_line(capsys):
    argv = ["--device", "cpu", "--sizes", "toy", "--matmul-n", "64", "--copy-mb", "1", "--repeats", "1"]
    assert gpu_figures.main([*argv, "--warmup", "0", "--update", "2x8", "--decode", "2x3x4"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["device"] == "cpu" and len(last["update"]) == 1 and len(last["decode"]) == 1
