"""Simulated Bradley-Terry annotators label with the frequencies σ((g(a) − g(b)) / τ) predicts."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rlhf_env.tasks.annotators import label_pairs, preference_probability, sample_preference_pairs
from rlhf_env.tasks.arithmetic import make_arithmetic_task, partial_credit
from rlhf_env.tiny import build_char_tokenizer, build_tiny_model


def test_preference_probability_is_the_logistic_of_the_scaled_gap():
    p = preference_probability(np.array([1.0, 0.0, 0.3, 100.0]), np.array([0.0, 0.0, 0.5, -100.0]), tau=0.5)
    expected = [1 / (1 + math.exp(-2.0)), 0.5, 1 / (1 + math.exp(0.4)), 1.0]
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="tau"):
        preference_probability(np.zeros(1), np.zeros(1), tau=0.0)


@pytest.mark.parametrize("gap, tau", [(0.0, 1.0), (0.5, 1.0), (1.0, 0.5), (-0.3, 0.25)])
def test_label_frequencies_match_sigma_within_sampling_error(gap, tau):
    n = 4000
    gold = lambda prompts, completions: [gap if c == "a" else 0.0 for c in completions]  # noqa: E731
    pairs = label_pairs(["x"] * n, ["a"] * n, ["b"] * n, gold, tau, np.random.default_rng(0))
    freq = np.mean([pair.chosen == "a" for pair in pairs])
    p = 1 / (1 + math.exp(-gap / tau))
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_sampled_pairs_are_distinct_and_prefer_the_better_sample():
    # Partial credit grades random digits finely; a few pairs in a hundred have a clear better side
    # (3-6 of 120 over seeds 0-3).
    task = dataclasses.replace(make_arithmetic_task(n_train=200, n_eval=10), gold_reward=partial_credit)
    model, tok = build_tiny_model(build_char_tokenizer("0123456789+-*= "), seed=1)
    pairs = task.preference_pairs(model, tok, 120, tau=0.05, seed=0)
    assert pairs == sample_preference_pairs(task, model, tok, 120, tau=0.05, seed=0)  # seeded
    assert len(pairs) == 120 and all(p.chosen != p.rejected for p in pairs)
    assert all(p.prompt in task.train_prompts for p in pairs)
    gaps = [partial_credit([p.prompt], [p.chosen])[0] - partial_credit([p.prompt], [p.rejected])[0] for p in pairs]
    clear = [g for g in gaps if abs(g) >= 0.3]  # σ(0.3 / 0.05) > 0.997: the better one wins
    assert len(clear) >= 2 and all(g > 0 for g in clear)
