"""Name -> class registries for methods and tasks: registration, lookup with a helpful error, and construction
from config options (an unknown option is an error that lists the valid ones)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from evalkv.errors import EvalkvError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, discover: Callable[[], None] | None = None):
        self.kind = kind
        self.classes: dict[str, type[T]] = {}
        self._discover = discover or (lambda: None)

    def register(self, name: str):
        def decorate(cls: type[T]) -> type[T]:
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        self._discover()
        return sorted(self.classes)

    def get(self, name: str) -> type[T]:
        if name not in self.classes:
            self._discover()
        if name not in self.classes:
            raise unknown_name(self.kind, name, list(self.classes), f"evalkv list {self.kind}s")
        return self.classes[name]

    def build(self, name: str, options: dict[str, Any]) -> T:
        cls = self.get(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise EvalkvError(
                f"{self.kind} {name!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(fields))}"
            )
        return cls(**options)
