"""Where the package caches what it builds or converts (base models, converted GGUF files)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RLHF_ENV_CACHE"


def cache_root() -> Path:
    """``$RLHF_ENV_CACHE``, else ``$XDG_CACHE_HOME/rlhf_env``, else ``~/.cache/rlhf_env``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlhf_env"
