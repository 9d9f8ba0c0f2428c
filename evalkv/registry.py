"""Name -> class registries for methods and tasks: registration (in code or by plug-ins), presets, lookup with a
helpful error, and construction from config options (an unknown option is an error that lists the valid ones).

A plug-in is an installed distribution that declares a module in the registry's entry-point group (`evalkv.methods`,
`evalkv.tasks`); importing the module registers its classes. The group is read once per process, the first time a
name is listed or not found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from evalkv.errors import EvalkvError, unknown_name, unknown_option

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.classes: dict[str, type[T]] = {}
        self.preset_of: dict[str, str] = {}  # a preset's name -> the name whose class it presets
        self._discovered = False

    def register(self, name: str, *, preset_of: str | None = None) -> Callable[[type[T]], type[T]]:
        """Register a class under `name`; `preset_of` marks it a preset of another registered name (a subclass
        that only changes defaults), which `evalkv list` shows under that name."""

        def decorate(cls: type[T]) -> type[T]:
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if preset_of is not None:
                self.preset_of[name] = preset_of
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorate

    def discover(self) -> None:
        """Import every module the installed plug-ins declare in the entry-point group (the first call only)."""
        if self._discovered:
            return
        for entry in entry_points(group=self.entry_point_group):
            try:
                entry.load()
            except Exception as error:  # a plug-in's own bug: name it rather than show its traceback
                source = f" (distribution {entry.dist.name})" if entry.dist else ""
                raise EvalkvError(
                    f"the {self.entry_point_group} plug-in {entry.name} = {entry.value}{source} failed to import: "
                    f"{type(error).__name__}: {error}; fix it or uninstall it"
                ) from None
        self._discovered = True

    def names(self) -> list[str]:
        self.discover()
        return sorted(self.classes)

    def presets(self, name: str) -> list[str]:
        """The registered presets of `name`, sorted."""
        return sorted(preset for preset, base in self.preset_of.items() if base == name and preset in self.classes)

    def get(self, name: str) -> type[T]:
        if name not in self.classes:
            self.discover()
        if name not in self.classes:
            raise unknown_name(self.kind, name, list(self.classes), f"evalkv list {self.kind}s")
        return self.classes[name]

    def options(self, name: str) -> list[str]:
        """The option names of `name` (its dataclass fields), sorted."""
        return sorted(field.name for field in dataclasses.fields(self.get(name)))

    def build(self, name: str, options: dict[str, Any]) -> T:
        known = self.options(name)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise unknown_option(f"{self.kind} {name!r}", unknown[0], known)
        return self.get(name)(**options)
