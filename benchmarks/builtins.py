"""The benchmarks layer's built-ins (the ``rlhf bench`` command), registered like any plugin's."""

from __future__ import annotations

from plugins import hookimpl


@hookimpl
def rlhf_register_commands(register):
    from benchmarks.commands import BENCH

    register("bench", BENCH)
