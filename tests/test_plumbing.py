"""The trainers' shared plumbing: the optimizer step, the minibatch order, metric means, state."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_env.algorithms.run.plumbing import Means, NonFiniteLossError, Optimizer, Stateful, draw_rows, minibatches
from rlhf_env.seeding import derive


def weights(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values))


# -- the optimizer step ------------------------------------------------------------------------


def test_step_clips_the_gradient_to_max_grad_norm_and_returns_the_norm_before():
    w = weights(1.0, 1.0)
    opt = Optimizer([w], lr=0.1, max_grad_norm=1.0)
    norm = opt.step((torch.tensor([3.0, 4.0]) * w).sum())  # ∇ = (3, 4), ‖∇‖ = 5
    assert norm == pytest.approx(5.0)
    # Clipped to norm 1: (0.6, 0.8); Adam's first moment after one step is (1 − β₁) g.
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(opt.torch.state[w]["exp_avg"], 0.1 * torch.tensor([0.6, 0.8]))
    # Adam's first step moves each weight by lr (m̂/√v̂ = ±1), against the gradient.
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, 0.9]))


def test_step_leaves_a_small_gradient_alone():
    w = weights(1.0, 1.0)
    opt = Optimizer([w], lr=0.1, max_grad_norm=10.0)
    assert opt.step((torch.tensor([3.0, 4.0]) * w).sum()) == pytest.approx(5.0)
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_step_refuses_a_non_finite_loss_naming_the_part_and_changes_nothing(bad):
    w = weights(1.0, 2.0)
    opt = Optimizer([w], lr=0.1, max_grad_norm=1.0)
    opt.step(w.sum())  # one good step: Adam has state
    before_w, before_state = w.detach().clone(), opt.state_dict()["state"][0]["exp_avg"].clone()
    value = w.sum() * 0.0 + 1.0
    kl = w.sum() * bad
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss: \{'kl': " + ("nan" if bad != bad else "inf")):
        opt.step(value + kl, value=value, kl=kl)
    assert torch.equal(w.detach(), before_w) and torch.equal(opt.torch.state[w]["exp_avg"], before_state)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss: \{'loss'"):  # no parts: the loss itself
        opt.step(w.sum() * bad)
    assert torch.equal(w.detach(), before_w)


def test_step_refuses_a_non_finite_gradient_from_a_finite_loss():
    w = weights(0.0)
    opt = Optimizer([w], lr=0.1, max_grad_norm=1.0)
    loss = torch.sqrt(w - w.detach()).sum()  # = 0, but d√u/du = ∞ at u = 0
    assert torch.isfinite(loss)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm"):
        opt.step(loss)
    assert w.item() == 0.0 and not opt.torch.state  # no Adam step was taken


def test_optimizer_rejects_a_non_positive_clip():
    with pytest.raises(ValueError, match="max_grad_norm must be > 0, got 0"):
        Optimizer([weights(1.0)], lr=0.1, max_grad_norm=0)


# -- minibatches -----------------------------------------------------------------------------


def test_minibatches_cover_every_row_once_per_epoch_in_a_seeded_order():
    batches = list(minibatches(10, 4, epochs=3, seed=7))
    assert len(batches) == 12  # exactly num_minibatches per epoch
    for epoch in range(3):
        parts = batches[4 * epoch : 4 * epoch + 4]
        assert sorted(len(p) for p in parts) == [2, 2, 3, 3]  # sizes differ by at most one
        assert sorted(torch.cat(parts).tolist()) == list(range(10))  # every row once
    # The order: one generator seeded with the seed's minibatch stream, one permutation per epoch.
    gen = torch.Generator().manual_seed(derive(7, "minibatches"))
    want = [torch.randperm(10, generator=gen) for _ in range(3)]
    assert [torch.cat(batches[4 * e : 4 * e + 4]).tolist() for e in range(3)] == [p.tolist() for p in want]
    assert want[0].tolist() != want[1].tolist()  # a fresh order each epoch
    again = list(minibatches(10, 4, epochs=3, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = torch.cat(list(minibatches(10, 4, epochs=1, seed=8)))
    assert other.tolist() != torch.cat(batches[:4]).tolist()


def test_minibatches_need_a_row_per_minibatch():
    with pytest.raises(ValueError, match=r"num_minibatches must be in \[1, 3\] \(the rows\), got 4"):
        next(minibatches(3, 4, epochs=1, seed=0))


def test_draw_rows_distinct_or_with_replacement():
    rows = draw_rows(5, 3, seed=1)
    assert len(set(rows)) == 3 and set(rows) <= set(range(5))
    assert sorted(draw_rows(5, 9, seed=1)) == list(range(5))  # at most every row, once each
    assert draw_rows(5, 3, seed=1) == rows  # seeded
    drawn = draw_rows(3, 20, seed=2, replacement=True)
    assert len(drawn) == 20 and len(set(drawn)) < 20
    assert drawn == torch.randint(3, (20,), generator=torch.Generator().manual_seed(derive(2, "rows"))).tolist()


# -- metric means and state --------------------------------------------------------------------


def test_means_average_each_name_over_the_updates_that_reported_it():
    means = Means()
    means.add({"a": torch.tensor(1.0), "b": 4.0})
    means.add({"a": 3.0})
    assert means.means() == {"a": 2.0, "b": 4.0}


class Toy(Stateful):
    state = {"optimizer": "optimizer", "head": "linear"}

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(2, 1)
        self.optimizer = Optimizer(self.linear.parameters(), lr=0.1, max_grad_norm=1.0)


def test_default_state_round_trip_restores_every_named_attribute():
    first = Toy(0)
    first.optimizer.step(first.linear(torch.ones(1, 2)).sum())
    state = copy.deepcopy(first.state_dict())  # as a checkpoint holds it: no tensors shared with `first`
    assert set(state) == {"optimizer", "head"} and set(state["optimizer"]) == {"state", "param_groups"}
    second = Toy(1)
    second.load_state_dict(state)
    assert torch.equal(second.linear.weight, first.linear.weight)
    x = torch.tensor([[1.0, -2.0]])
    for t in (first, second):  # the same next step: Adam's moments came along
        t.optimizer.step(t.linear(x).sum())
    assert torch.equal(second.linear.weight, first.linear.weight)


def test_loading_a_state_without_a_key_names_what_is_missing():
    with pytest.raises(ValueError, match=r"test_plumbing trainer state lacks \['head'\]; it has \['optimizer'\]"):
        Toy(0).load_state_dict({"optimizer": Toy(0).optimizer.state_dict()})


@pytest.mark.parametrize(
    "lr, max_grad_norm, named",
    [
        (0.0, 1.0, ": lr must be > 0"),
        (1e-3, -1.0, ": max_grad_norm must be > 0"),
        (0.0, 0.0, ": lr and max_grad_norm must be > 0"),
    ],
)
def test_optimizer_settings_are_checked_once_naming_the_bad_fields(lr, max_grad_norm, named):
    from types import SimpleNamespace

    from rlhf_env.algorithms.run.plumbing import check_optimizer_settings

    check_optimizer_settings(SimpleNamespace(lr=1e-3, max_grad_norm=1.0), "X")  # valid: nothing raised
    with pytest.raises(ValueError, match="^X lr and max_grad_norm must be > 0, got lr=") as info:
        check_optimizer_settings(SimpleNamespace(lr=lr, max_grad_norm=max_grad_norm), "X")
    assert str(info.value).endswith(named)


def test_a_minibatch_carries_its_data_parallel_weight_and_the_run_holds_none():
    """Rank 1 of 2: its part of each minibatch and that part's weight travel together, nothing in the run's state."""
    import dataclasses

    from rlhf_env.algorithms.run.plumbing import draw_part, weighted_minibatches
    from rlhf_env.algorithms.scale import distributed

    dp = distributed.DataParallel(rank=1, world_size=2, local_rank=1, backend="gloo", device=torch.device("cpu"))
    with distributed.active(dp):
        (part,) = weighted_minibatches(5, 1, epochs=1, seed=3)
        assert (
            part.of.tolist()
            == torch.randperm(5, generator=torch.Generator().manual_seed(derive(3, "minibatches"))).tolist()
        )
        assert part.rows.tolist() == part.of.tolist()[3:] and part.weight == 2 / 5  # tensor_split: 3 + 2 rows
        mask = torch.zeros(5, 4)
        mask[part.of[:3], :1] = 1  # rank 0's rows: one token each
        mask[part.rows, :] = 1  # this rank's: four each
        assert part.by_tokens(mask).weight == 8 / 11 and part.weight == 2 / 5  # a new Part; this one unchanged
        drawn = draw_part(6, 4, seed=0)
        assert len(drawn.rows) == 2 and drawn.weight == 0.5
        assert {f.name for f in dataclasses.fields(dp)} == {
            "rank",
            "world_size",
            "local_rank",
            "backend",
            "device",
            "sharded",
        }  # no per-minibatch share
        assert dp.loss_scale(part.weight) == 2 / 5 and dp.loss_scale(None) == 1 / 2
    (alone,) = weighted_minibatches(5, 1, epochs=1, seed=3)
    assert alone.weight == 1.0 and torch.equal(alone.rows, alone.of) and alone.by_tokens(mask) is alone
