"""The algorithm zoo. Each algorithm module registers itself through ``rlhf_env.algorithms.builtins``."""
