"""The plugin contract: hookspecs, registries and the manager that fills them.

Depends on pluggy only. Third-party code should import ``hookimpl`` from ``rlhf_env``.
"""

from rlhf_env.plugins.hookspecs import hookimpl, hookspec
from rlhf_env.plugins.manager import (
    BUILTIN_MODULES,
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PluginHost,
    PluginLoadWarning,
    get_host,
    reset_host,
)
from rlhf_env.plugins.registry import DuplicateNameError, Registry, UnknownNameError

__all__ = [
    "BUILTIN_MODULES",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "DuplicateNameError",
    "PluginHost",
    "PluginLoadWarning",
    "Registry",
    "UnknownNameError",
    "get_host",
    "hookimpl",
    "hookspec",
    "reset_host",
]
