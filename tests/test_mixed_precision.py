"""Mixed precision (``train(dtype=bfloat16)``, ``rlhf train --dtype``): float32 masters and Adam state,
low-dtype compute and reference; float16's loss scaling."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_env.algorithms.base import AlgorithmSpec
from rlhf_env.algorithms.run import precision
from rlhf_env.algorithms.run.loop import train
from rlhf_env.algorithms.run.plumbing import Optimizer
from rlhf_env.algorithms.zoo import grpo
from rlhf_env.tasks.arithmetic import make_arithmetic_task

CONFIG = {"num_prompts": 4, "group_size": 4, "num_minibatches": 1, "kl_coef": 0.1}


class Kept(grpo.Trainer):
    """GRPO that remembers its instances, so the test can look at the models and the Adam state."""

    made: list = []

    def __init__(self, ctx, config):
        super().__init__(ctx, config)
        Kept.made.append(self)


def run(tmp_path, dtype):
    task = make_arithmetic_task(digits=1, n_train=80, n_eval=20, sft_steps=100)
    out = tmp_path / str(dtype)
    kw = dict(steps=1, eval_prompts=8, progress=False, device="cpu", config=CONFIG, dtype=dtype)
    records = train(AlgorithmSpec(grpo.Config, Kept), task, out, **kw)
    return records[0], Kept.made[-1]


def test_bfloat16_trains_float32_masters_and_starts_where_float32_does(tmp_path):
    full, _ = run(tmp_path, None)
    mixed, trainer = run(tmp_path, torch.bfloat16)
    ctx = trainer.ctx
    assert ctx.compute_dtype == torch.bfloat16
    assert {p.dtype for p in ctx.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in ctx.ref.parameters()} == {torch.bfloat16}  # frozen: stored low
    moments = [t for s in trainer.optimizer.torch.state.values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert trainer.optimizer.scaler is None  # bf16 has float32's range: no loss scaling
    # Step 0: the policy is the reference, so the k3 KL is ~0 in both (bf16 rounding, not 434);
    # the losses and gradient norms agree with the float32 run's to bf16's precision.
    for rec in (full, mixed):
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())
        assert abs(rec["loss/kl"]) < 1e-3
    assert mixed["optim/grad_norm"] == pytest.approx(full["optim/grad_norm"], rel=0.1)
    assert mixed["loss/policy"] == pytest.approx(full["loss/policy"], abs=0.05)
    assert mixed["reward/gold"] == pytest.approx(full["reward/gold"], abs=0.25)


def test_autocast_context_of_a_step():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    with precision.autocast(cpu, torch.bfloat16):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with precision.autocast(cpu, None):  # a plain CPU run: no autocast, as before mixed precision
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    assert precision.weights_dtype(torch.float16) == torch.float32 and precision.weights_dtype(None) is None


def test_float16_scales_the_loss_and_skips_an_overflowing_step():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 1)
    opt = Optimizer(layer.parameters(), lr=0.1, max_grad_norm=1e9)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        # A gradient of ~1e-8 per weight: below float16's smallest subnormal (6e-8) unscaled.
        norm = opt.step(layer(x).float().mean() * 1e-8)
    assert opt.scaler is not None and opt.scaler.get_scale() == 2.0**16
    assert 1e-9 < norm < 1e-6  # the true (unscaled) gradient, not the scaled one nor zero
    before = [p.detach().clone() for p in layer.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        norm = opt.step(layer(x).float().mean() * 1e30)  # overflows once scaled
    assert not math.isfinite(norm) and opt.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # the step was skipped
