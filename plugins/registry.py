"""Name -> object registries, one per kind of thing plugins add."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rlhf_env.plugins.errors import UserError


class DuplicateNameError(UserError, ValueError):
    """Two plugins (or one plugin twice) registered the same name for one kind."""


class UnknownNameError(UserError, KeyError):
    """A lookup for a name nobody registered; the message lists the names that exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    plugin: str


class Registry:
    """Ordered mapping of ``name -> Entry`` for one kind (``"algorithm"``, ``"task"``, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, obj: Any, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise DuplicateNameError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            other = self._entries[name].plugin
            raise DuplicateNameError(
                f"{self.kind} {name!r} from plugin {plugin!r} is already registered by plugin {other!r}"
            )
        self._entries[name] = Entry(name, obj, plugin)

    def copy(self) -> Registry:
        twin = Registry(self.kind)
        twin._entries = dict(self._entries)
        return twin

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
