"""Built-in algorithms, registered through the same hook as any third-party plugin.

The zoo (PPO, GRPO, DPO, REINFORCE, SFT, reward model) lands here module by module.
"""

from __future__ import annotations

from plugins import hookimpl


@hookimpl
def rlhf_register_algorithms(register):
    """No built-in algorithm yet."""
