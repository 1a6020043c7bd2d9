"""The shared pieces of the 2025 online zoo (algorithms/maths.py, docs/maths.md §13), each by hand:
leave-one-out baselines, the three loss aggregations, asymmetric clipping, sequence ratios."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_env.algorithms import maths

# (B=2, T=5) action coordinates: position 0 is a prompt position; row 0 has 2 completion
# tokens, row 1 has 3. What sits outside the mask must change nothing.
MASK = torch.tensor([[0.0, 1, 1, 0, 0], [0.0, 1, 1, 1, 0]])


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    # group 0 sums to 2: (2 − 1)/3, (2 − 0)/3, ...; group 1 sums to 11: (11 − 2)/3 = 3, (11 − 5)/3 = 2.
    want = [1 / 3, 2 / 3, 2 / 3, 1 / 3, 3.0, 3.0, 3.0, 2.0]
    torch.testing.assert_close(maths.leave_one_out_baseline(scores, 4), torch.tensor(want))
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        maths.leave_one_out_baseline(scores, 3)
    with pytest.raises(ValueError, match="group_size=1 >= 2"):
        maths.leave_one_out_baseline(scores, 1)


def test_the_three_aggregations_by_hand():
    x = torch.tensor([[9.0, 1, 3, 9, 9], [9.0, 4, 4, 4, 9]])
    assert maths.token_mean(x, MASK).item() == pytest.approx((1 + 3 + 12) / 5)  # every token alike
    assert maths.seq_mean(x, MASK).item() == pytest.approx((2 + 4) / 2)  # mean of per-completion means
    assert maths.seq_sum_norm(x, MASK, max_new_tokens=4).item() == pytest.approx(16 / (4 * 2))
    x = x.clone().requires_grad_(True)
    maths.token_mean(x, MASK).backward()
    torch.testing.assert_close(x.grad, MASK / 5)
    x.grad = None
    maths.seq_mean(x, MASK).backward()  # a token of the short completion weighs 1/(2·2), of the long one 1/(2·3)
    torch.testing.assert_close(x.grad, torch.tensor([[0, 1 / 4, 1 / 4, 0, 0], [0, 1 / 6, 1 / 6, 1 / 6, 0]]))


def test_asymmetric_clipping_by_hand():
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5], requires_grad=True)
    s, clipped = maths.asymmetric_clipped_surrogate(ratio, torch.tensor(1.0), eps_low=0.2, eps_high=0.3)
    # Â > 0: min(ρ, clip(ρ, 0.8, 1.3)) = 0.5, 0.9, 1.1, 1.3; only ρ = 1.5 is clipped (gradient cut).
    torch.testing.assert_close(s, torch.tensor([0.5, 0.9, 1.1, 1.3]))
    assert clipped.tolist() == [False, False, False, True]
    s.sum().backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    ratio.grad = None
    s, clipped = maths.asymmetric_clipped_surrogate(ratio, torch.tensor(-1.0), eps_low=0.2, eps_high=0.3)
    # Â < 0: min(−ρ, −clip ρ) = −0.8, −0.9, −1.1, −1.5; ρ = 0.5 is clipped at 1 − ε_low.
    torch.testing.assert_close(s, torch.tensor([-0.8, -0.9, -1.1, -1.5]))
    assert clipped.tolist() == [True, False, False, False]
    s.sum().backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([0.0, -1.0, -1.0, -1.0]))
    # ε_low = ε_high = ε is the symmetric surrogate.
    r = torch.tensor([[0.5, 1.5]])
    sym, _ = maths.clipped_surrogate(r.log(), torch.zeros_like(r), torch.tensor([[1.0, -1.0]]), 0.2)
    asym, _ = maths.asymmetric_clipped_surrogate(r, torch.tensor([[1.0, -1.0]]), 0.2, 0.2)
    torch.testing.assert_close(sym, asym)


def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    old = torch.full((2, 5), -1.0)
    delta = torch.tensor([[7.0, 0.2, 0.4, 7, 7], [7.0, 0.1, 0.1, 0.4, 7]])  # 7: outside the mask
    logp = (old + delta).requires_grad_(True)
    s = maths.sequence_ratio(logp, old, MASK)
    torch.testing.assert_close(s, torch.tensor([math.exp(0.3), math.exp(0.2)]))
    s.sum().backward()
    # ∂s_i/∂log π_t = s_i / |y_i| on completion i's tokens.
    want = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]) * torch.tensor([[math.exp(0.3) / 2], [math.exp(0.2) / 3]])
    torch.testing.assert_close(logp.grad, want.float())
