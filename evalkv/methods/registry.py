"""Methods by name. Built-ins register with `@register`; third parties may too, or through the `evalkv.methods`
entry-point group (a module whose import registers its methods)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from evalkv.methods.base import Method
from evalkv.registry import Registry


def _load_entry_points() -> None:
    for entry in entry_points(group="evalkv.methods"):
        entry.load()


REGISTRY: Registry[Method] = Registry("method", discover=_load_entry_points)
METHODS = REGISTRY.classes
register = REGISTRY.register


def method_names() -> list[str]:
    return REGISTRY.names()


def method_class(name: str) -> type[Method]:
    return REGISTRY.get(name)


def build_method(name: str, options: dict[str, Any]) -> Method:
    return REGISTRY.build(name, options)
