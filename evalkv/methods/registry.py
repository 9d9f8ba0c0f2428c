"""Methods by name. Built-ins register with `@register`; third parties may too, or through the `evalkv.methods`
entry-point group (a module whose import registers its methods). `@register(name, preset_of=base)` marks a preset:
a subclass of the base that only changes defaults (OBCache's reference tags)."""

from __future__ import annotations

from typing import Any

from evalkv.methods.base import Method, check_key_channels
from evalkv.registry import Registry

REGISTRY: Registry[Method] = Registry("method", entry_point_group="evalkv.methods")
METHODS = REGISTRY.classes
register = REGISTRY.register


def method_names() -> list[str]:
    return REGISTRY.names()


def method_class(name: str) -> type[Method]:
    return REGISTRY.get(name)


def build_method(name: str, options: dict[str, Any]) -> Method:
    method = REGISTRY.build(name, options)
    check_key_channels(method)
    return method
