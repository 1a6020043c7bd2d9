"""Sub-seeds: one run seed, independent streams for the prompt draw, the sampler and the minibatches."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf_env.algorithms.run.plumbing import draw_rows, minibatches
from rlhf_env.seeding import SEED_BITS, derive


def test_derive_is_a_pure_function_of_its_arguments_in_range():
    seeds = {(s, name, i): derive(s, name, i) for s in range(5) for name in ("prompts", "sampler") for i in range(50)}
    assert all(0 <= v < 2**SEED_BITS for v in seeds.values())
    assert len(set(seeds.values())) == len(seeds)  # no two streams share a seed
    assert derive(3, "sampler", 7) == seeds[(3, "sampler", 7)]
    assert derive(3, "sampler") != derive(3, "sampler", 0)  # an index is part of the stream
    assert derive(-1, "x") == derive(2**64 - 1, "x")  # negatives wrap, never raise


def test_derive_is_the_same_in_another_process():
    """Not Python's salted ``hash``: a resumed run and a data-parallel rank derive the same seeds."""
    code = "from rlhf_env.seeding import derive; print(derive(11, 'minibatches', 4))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == derive(11, "minibatches", 4)


def test_minibatches_and_row_draws_do_not_reuse_the_step_seed_state():
    """The old bug: the permutation came from ``manual_seed(seed)``, the state the rollout drew from too."""
    for seed in range(5):
        same_state = torch.randperm(16, generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(next(minibatches(16, 1, 1, seed)), same_state)
        assert draw_rows(16, 16, seed) != same_state.tolist()
        assert torch.equal(next(minibatches(16, 1, 1, seed)), next(minibatches(16, 1, 1, seed)))


@pytest.mark.parametrize("bad", ["", None, 3])
def test_a_stream_is_a_name(bad):
    with pytest.raises(ValueError, match="stream"):
        derive(0, bad)
