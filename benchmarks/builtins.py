"""The benchmarks layer's built-ins (the ``rlhf bench`` command), registered like any plugin's."""

from __future__ import annotations

from rlhf_env.plugins import hookimpl


@hookimpl
def rlhf_register_commands(register):
    from rlhf_env.bench.commands import BENCH

    register("bench", BENCH)
