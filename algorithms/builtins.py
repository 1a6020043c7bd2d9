"""Built-in algorithms, registered through the same hook as any third-party plugin."""

from __future__ import annotations

from plugins import hookimpl


@hookimpl
def rlhf_register_algorithms(register):
    from algorithms import reinforce
    from algorithms.base import AlgorithmSpec

    register("reinforce", AlgorithmSpec(reinforce.Config, reinforce.Trainer, "REINFORCE with a mean baseline"))
