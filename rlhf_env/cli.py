"""``rlhf_env.cli``: the ``rlhf`` entry point, kept under its old name.

The entry point itself is ``plugins.cli.main``, at the bottom layer; every subcommand is a
plugin (``rlhf_register_commands``). The rollout helpers live in ``rlhf_env.commands``.
"""

from __future__ import annotations

import sys

from plugins.cli import main
from rlhf_env.commands import Episode, EpisodeTracker, RolloutResult, clip, run_rollout

__all__ = ["Episode", "EpisodeTracker", "RolloutResult", "clip", "main", "run_rollout"]

if __name__ == "__main__":
    sys.exit(main())
