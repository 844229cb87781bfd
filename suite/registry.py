"""Registries for tasks, measures and hardware profiles.

A registry maps a name to an entry that is loaded lazily: either an object, or a
``"module:attribute"`` string imported on first use, or a loader callable for
data files (task and profile YAML). Built-ins are discovered from the project's
folders; plugins come from Python entry-point groups (``exitbench.tasks``,
``exitbench.measures``, ``exitbench.profiles``). An unknown name is answered
with the closest valid names.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Generic, TypeVar

from suite.errors import UnknownNameError

T = TypeVar("T")


@dataclass
class _Entry:
    source: str  # "builtin", "plugin:<dist>" or "runtime"
    load: Callable[[], Any]
    value: Any = None
    loaded: bool = False


def import_object(spec: str) -> Any:
    """Import ``"package.module:attribute"``."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def closest_names(name: str, names: list[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name``; substring matches count too."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    for other in names:
        if len(close) >= n:
            break
        if other not in close and (name in other or other in name):
            close.append(other)
    return close


class Registry(Generic[T]):
    """Name -> lazily loaded entry, with "did you mean" on a miss."""

    def __init__(self, kind: str, entry_point_group: str | None = None,
                 discover: Callable[[Registry[T]], None] | None = None,
                 check: Callable[[str, Any], T] | None = None,
                 plugin_loader: Callable[[Any, str], Callable[[], Any]] | None = None):
        """``plugin_loader(entry_point, dist)`` makes the loader of a plugin entry (default:
        ``entry_point.load``); measures use it to load plugins in a sandbox instead."""
        self.kind = kind
        self._plugin_loader = plugin_loader
        self.entry_point_group = entry_point_group
        self._discover = discover
        self._check = check
        self._entries: dict[str, _Entry] = {}
        self._discovered = False

    # -- registration -------------------------------------------------
    def register(self, name: str, obj: Any = None, *, loader: Callable[[], Any] | None = None,
                 source: str = "runtime", replace: bool = False) -> None:
        """Register ``obj`` (an object or ``"module:attr"``) or a ``loader`` under ``name``."""
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"(from {self._entries[name].source}); pass replace=True to override")
        if loader is None:
            if isinstance(obj, str):
                loader = lambda spec=obj: import_object(spec)  # noqa: E731
            else:
                loader = lambda value=obj: value  # noqa: E731
        self._entries[name] = _Entry(source=source, load=loader)

    def _ensure_discovered(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if self._discover is not None:
            self._discover(self)
        if self.entry_point_group:
            for ep in metadata.entry_points(group=self.entry_point_group):
                dist = ep.dist.name if ep.dist is not None else "unknown"
                if ep.name in self._entries:
                    continue  # built-ins win; a plugin cannot shadow them silently
                loader = self._plugin_loader(ep, dist) if self._plugin_loader else ep.load
                self.register(ep.name, loader=loader, source=f"plugin:{dist}")

    # -- lookup -------------------------------------------------------
    def names(self) -> list[str]:
        self._ensure_discovered()
        return sorted(self._entries)

    def source(self, name: str) -> str:
        self._ensure_discovered()
        return self._entries[name].source

    def __contains__(self, name: object) -> bool:
        self._ensure_discovered()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unknown(self, name: str) -> UnknownNameError:
        names = self.names()
        close = closest_names(name, names)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(names) or '(none)'}"
            f" (list them with `exitbench ls {self.kind}s`).")

    def get(self, name: str) -> T:
        self._ensure_discovered()
        entry = self._entries.get(name)
        if entry is None:
            raise self.unknown(name)
        if not entry.loaded:
            value = entry.load()
            if self._check is not None:
                value = self._check(name, value)
            entry.value, entry.loaded = value, True
        return entry.value
