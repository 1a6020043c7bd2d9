"""Independent random streams from one seed.

A run has one integer seed, and several consumers draw from it at every step: the env's prompt
draw, the sampler, the minibatch permutation, torch's global generator. Seeding each of them with
the same integer hands them identical generator states, so their draws are correlated (the
first prompt index and the first minibatch row come from the same numbers). ``derive`` gives each
consumer a seed of its own: ``numpy.random.SeedSequence`` hashes ``(seed, stream, *index)`` into
a state no other ``(stream, index)`` shares, the same on every machine and in every process.

    derive(seed, "step", step)   # what a trainer's step gets
    derive(step_seed, "prompts") # the env's prompt draw at that step (``rollout.collect``)
    derive(step_seed, "sampler") # the sampler's generator
    derive(step_seed, "minibatches")  # the minibatch permutation (``plumbing.weighted_minibatches``)
"""

from __future__ import annotations

import zlib

import numpy as np

SEED_BITS = 31  # torch.manual_seed, numpy and Python's random all take it; so does ``seed * k + i`` arithmetic


def derive(seed: int, stream: str, *index: int) -> int:
    """A non-negative ``SEED_BITS``-bit seed for the named ``stream`` (and ``index``, e.g. a step or a row).

    Distinct ``(stream, index)`` give statistically independent seeds; the same arguments always give
    the same one. Negative seeds and indices are taken modulo 2**64.
    """
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"a stream is a non-empty name, got {stream!r}")
    key = (zlib.crc32(stream.encode()), *(int(i) % 2**64 for i in index))
    state = np.random.SeedSequence(int(seed) % 2**64, spawn_key=key).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - SEED_BITS)
