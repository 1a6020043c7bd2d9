"""Plugin discovery and registration.

Third-party plugins come from the ``rlhf_env`` entry-point group; the built-ins are
modules loaded the same way, by name, after them. Registration then asks every plugin's
hooks, built-ins first, so a third-party plugin that reuses a built-in name is the one
reported. A plugin that fails to import or to register is recorded in ``failures`` (and
warned about) while every other plugin still loads.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

import pluggy

from rlhf_env.plugins import hookspecs
from rlhf_env.plugins.registry import Registry

ENTRY_POINT_GROUP = "rlhf_env"
DISABLE_AUTOLOAD_ENV = "RLHF_ENV_DISABLE_PLUGIN_AUTOLOAD"
# Modules whose hookimpls are the built-in tasks, rewards and algorithms. Named, not
# imported, so this layer never imports the layers above it.
BUILTIN_MODULES: tuple[str, ...] = ("rlhf_env.builtins", "rlhf_env.algorithms.builtins", "rlhf_env.bench.builtins")

# hook name -> (registry kind, registry attribute)
KINDS = {
    "rlhf_register_algorithms": ("algorithm", "algorithms"),
    "rlhf_register_tasks": ("task", "tasks"),
    "rlhf_register_rewards": ("reward", "rewards"),
    "rlhf_register_commands": ("command", "commands"),
    "rlhf_register_generators": ("generator", "generators"),
    "rlhf_register_interactions": ("interaction", "interactions"),
}


class PluginLoadWarning(UserWarning):
    """A plugin failed to import or register; the others loaded."""


def autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PluginHost:
    """Owns the pluggy manager and the registries filled from it.

    ``load()`` imports plugins; the registries are built on first access and rebuilt
    after ``register``/``unregister`` (so a test can add a plugin in a fixture).
    """

    def __init__(self, builtins: Iterable[str] = BUILTIN_MODULES, autoload: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.builtins = tuple(builtins)
        self.autoload = (not autoload_disabled()) if autoload is None else autoload
        self.failures: dict[str, str] = {}
        self._register_failures: set[str] = set()  # re-judged on every rebuild
        self._builtin_names: list[str] = []
        self._registries: dict[str, Registry] | None = None

    # -- loading ---------------------------------------------------------------------
    def load(self) -> PluginHost:
        if self.autoload:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                self._load_one(ep.name, ep.load)
        for module in self.builtins:
            if self._load_one(module, lambda m=module: importlib.import_module(m)):
                self._builtin_names.append(module)
        return self

    def _load_one(self, name: str, loader: Callable[[], Any]) -> bool:
        if self.pm.has_plugin(name):
            return False
        try:
            self.pm.register(loader(), name=name)
        except Exception as exc:  # a broken plugin must not hide the others
            self._fail(name, f"failed to load: {type(exc).__name__}: {exc}")
            return False
        self._registries = None
        return True

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register an in-process plugin object (module or instance) directly."""
        registered = self.pm.register(plugin, name=name)
        self._registries = None
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.failures.pop(name, None)
        self._registries = None

    def _fail(self, plugin: str, message: str) -> None:
        self.failures[plugin] = message
        warnings.warn(f"rlhf_env plugin {plugin!r} {message}", PluginLoadWarning, stacklevel=3)

    # -- registries ------------------------------------------------------------------
    def _build(self) -> dict[str, Registry]:
        impls: dict[str, dict[str, Any]] = {}  # plugin name -> {registry attr: hook function}
        for hook_name, (_, attr) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                impls.setdefault(impl.plugin_name, {})[attr] = impl.function
        # Registration order decides who keeps a contested name (built-ins first), whatever
        # hooks each plugin implements; a conflict that is gone no longer fails a plugin.
        registered = [name for name, _ in self.pm.list_name_plugin() if name in impls]
        order = sorted(registered, key=lambda name: name not in self._builtin_names)  # stable
        for name in self._register_failures:
            self.failures.pop(name, None)
        self._register_failures.clear()

        registries = {attr: Registry(kind) for kind, attr in KINDS.values()}
        for plugin_name in order:
            if plugin_name in self.failures:
                continue
            # Each plugin is called on its own (pluggy would stop at the first raise) and
            # its names are committed only if all its hooks succeed, so a plugin that
            # fails half-way leaves nothing half-registered behind.
            trial = {attr: reg.copy() for attr, reg in registries.items()}
            try:
                for attr, function in impls[plugin_name].items():
                    function(register=lambda name, obj, a=attr, t=trial, p=plugin_name: t[a].add(name, obj, p))
            except Exception as exc:
                self._register_failures.add(plugin_name)
                self._fail(plugin_name, f"failed to register: {type(exc).__name__}: {exc}")
                continue
            registries = trial
        return registries

    def _registry(self, attr: str) -> Registry:
        if self._registries is None:
            self._registries = self._build()
        return self._registries[attr]

    @property
    def algorithms(self) -> Registry:
        return self._registry("algorithms")

    @property
    def tasks(self) -> Registry:
        return self._registry("tasks")

    @property
    def rewards(self) -> Registry:
        return self._registry("rewards")

    @property
    def commands(self) -> Registry:
        return self._registry("commands")

    @property
    def generators(self) -> Registry:
        return self._registry("generators")

    @property
    def interactions(self) -> Registry:
        """Multi-turn interactions: name -> a zero-argument factory returning an ``Interaction``."""
        return self._registry("interactions")

    def describe(self) -> dict[str, Any]:
        """Everything registered, with the plugin that provided it (what ``rlhf list`` prints)."""
        out: dict[str, Any] = {}
        for _, attr in KINDS.values():
            out[attr] = [
                {"name": e.name, "plugin": e.plugin, "description": _describe(e.obj)} for e in self._registry(attr)
            ]
        out["failed"] = [{"plugin": p, "error": m} for p, m in self.failures.items()]
        return out


def _describe(obj: Any) -> str:
    """A registered object's one-line description (an algorithm's ``description``, a command's ``help``)."""
    text = getattr(obj, "description", None) or getattr(obj, "help", None) or ""
    return text.strip().splitlines()[0] if isinstance(text, str) and text.strip() else ""


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, loaded on first use (never as an import side effect)."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost().load()
    return _HOST


def reset_host() -> None:
    """Forget the process-wide host; the next ``get_host()`` loads plugins afresh."""
    global _HOST
    _HOST = None
