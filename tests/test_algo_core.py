"""Shared maths by hand: masked reductions, whitening, GAE, KL estimators."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_env.algorithms.maths import gae, kl_k1, kl_k2, kl_k3, masked_mean, masked_sum, masked_whiten


def test_masked_reductions_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_sum(x, m).item() == 6.0
    assert masked_mean(x, m).item() == 2.0
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 3.0]
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # nothing masked in: 0, not NaN


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 3.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    assert w[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6) and w[0, 2] == 0


def gae_loop(rewards, values, length, gamma, lam):
    """GAE for one sequence of ``length`` tokens, straight from the definition."""
    adv = [0.0] * length
    for t in range(length):
        total = 0.0
        for k in range(length - t):
            v_next = values[t + k + 1] if t + k + 1 < length else 0.0
            delta = rewards[t + k] + gamma * v_next - values[t + k]
            total += (gamma * lam) ** k * delta
        adv[t] = total
    return adv


def test_gae_hand_worked_three_tokens():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, gae_lambda=0.5)
    # δ = [0, 0, 0.5]; Â_2 = 0.5, Â_1 = 0 + 0.5·0.5 = 0.25, Â_0 = 0 + 0.5·0.25 = 0.125
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert ret[0].tolist() == pytest.approx([0.625, 0.75, 1.0])


def test_vectorised_gae_matches_the_plain_loop_with_masks():
    gen = torch.Generator().manual_seed(0)
    B, T = 5, 7
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lengths = [7, 1, 4, 0, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = gae(r, v, mask, gamma=0.9, gae_lambda=0.8)
    for b, n in enumerate(lengths):
        expected = gae_loop(r[b].tolist(), v[b].tolist(), n, 0.9, 0.8)
        assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
        assert ret[b, :n].tolist() == pytest.approx([a + x for a, x in zip(expected, v[b, :n].tolist())], abs=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    # k3 = π_ref/π − log(π_ref/π) − 1 = 0.5 − log 0.5 − 1
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k3(ref, ref).item() == 0.0
