"""``python -m rlhf_env``: the ``rlhf`` command (also what ``torchrun -m rlhf_env`` runs)."""

import sys

from rlhf_env.plugins.cli import main

sys.exit(main())
