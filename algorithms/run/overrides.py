"""Typed config overrides (``--set``, suite ``[hparams]``): the converter lives in the env layer,
``rlhf_env.typed``, so the env layer's commands type task knobs with it too."""

from __future__ import annotations

from rlhf_env.typed import (
    FALSE,
    NONE,
    TRUE,
    ConfigError,
    config_types,
    convert,
    signature_types,
    split_assignments,
    typed_overrides,
    typed_values,
)

__all__ = [
    "FALSE",
    "NONE",
    "TRUE",
    "ConfigError",
    "config_types",
    "convert",
    "signature_types",
    "split_assignments",
    "typed_overrides",
    "typed_values",
]
