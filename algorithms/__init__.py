"""The algorithm zoo. Each algorithm module registers itself through ``algorithms.builtins``."""
