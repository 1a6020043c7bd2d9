"""``rlhf_env.cli``: the ``rlhf`` entry point, kept under its old name.

The entry point itself is ``rlhf_env.plugins.cli.main``, at the bottom layer; every subcommand is a
plugin (``rlhf_register_commands``). The rollout helpers live in ``rlhf_env.commands`` and ``rlhf_env.rollout_command``.
"""

from __future__ import annotations

import sys

from rlhf_env.commands import clip, run_rollout
from rlhf_env.plugins.cli import main
from rlhf_env.rollout import Episode
from rlhf_env.rollout_command import RolloutResult

__all__ = ["Episode", "RolloutResult", "clip", "main", "run_rollout"]

if __name__ == "__main__":
    sys.exit(main())
