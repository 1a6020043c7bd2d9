"""Best-of-n: the KL formula against a hand computation, the selection on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_env.algorithms.run import metrics as M
from rlhf_env.bench.best_of_n import best_of_n, best_of_n_kl, evaluate_best_of_n, powers_of_two
from rlhf_env.rewards import completion_length
from rlhf_env.tasks.arithmetic import make_arithmetic_task
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model


def test_the_kl_formula_by_hand_and_against_the_exact_best_of_n_distribution():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)  # log 2 − 1/2
    assert best_of_n_kl(4) == pytest.approx(1.386294 - 0.75, abs=1e-6)  # log 4 − 3/4
    assert best_of_n_kl(64) == pytest.approx(4.158883 - 63 / 64, abs=1e-6)
    # K equally likely outcomes with distinct rewards: best-of-n picks the i-th lowest with
    # probability (i/K)^n − ((i−1)/K)^n; its KL to the uniform tends to the formula as K grows.
    K, n = 100_000, 8
    i = torch.arange(1, K + 1, dtype=torch.float64)
    p = (i / K) ** n - ((i - 1) / K) ** n
    exact = float((p * torch.log(p * K)).sum())
    assert exact == pytest.approx(best_of_n_kl(n), abs=1e-3)
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl(0)
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="power of two"):
        powers_of_two(48)


def test_the_sample_with_the_highest_proxy_is_chosen_and_its_gold_reported():
    proxy = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.0, 1.0]])
    gold = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    curve = best_of_n(proxy, gold, [1, 2, 4])
    assert [c["n"] for c in curve] == [1, 2, 4]
    # By proxy rank, row 1's gold is (1, 4, 3, 2) and row 2's (7, 5, 6, 8) (the tie keeps sample order).
    # n = 1: every sample once, the means (2.5 and 6.5). n = 4: the top one (2 and 8).
    # n = 2: rank i is the best of a pair with probability (i − 1)/6: (0·1 + 1·4 + 2·3 + 3·2)/6 = 16/6
    # and (0·7 + 1·5 + 2·6 + 3·8)/6 = 41/6.
    assert [c[M.REWARD_GOLD] for c in curve] == pytest.approx([4.5, (16 / 6 + 41 / 6) / 2, 5.0])
    assert [c[M.REWARD_PROXY] for c in curve] == pytest.approx([(0.425 + 0.4) / 2, 0.65, 0.95])
    assert curve[1][M.OBJECTIVE_KL_BEST_OF_N] == pytest.approx(math.log(2) - 0.5)


def test_best_of_n_of_a_model_against_a_proxy():
    task = make_arithmetic_task(digits=1, n_train=20, n_eval=10)
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), n_layer=1, n_embd=16, seed=0)
    curve = evaluate_best_of_n(task, model, tok, completion_length(max_chars=8), task.eval_prompts[:5], 8, chunk=16)
    proxies = [c[M.REWARD_PROXY] for c in curve]
    assert [c["n"] for c in curve] == [1, 2, 4, 8]
    assert proxies == sorted(proxies) and proxies[-1] > proxies[0]  # the best of more samples is no worse
    gold_only = evaluate_best_of_n(task, model, tok, None, task.eval_prompts[:5], 2, chunk=16)
    assert all(c[M.REWARD_GOLD] == c[M.REWARD_PROXY] for c in gold_only)
