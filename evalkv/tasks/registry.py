"""Tasks by name. Built-ins register with `@register_task`; third parties may too, or through the `evalkv.tasks`
entry-point group (a module whose import registers its tasks)."""

from __future__ import annotations

from typing import Any

from evalkv.registry import Registry
from evalkv.tasks.base import Task

REGISTRY: Registry[Task] = Registry("task", entry_point_group="evalkv.tasks")
TASKS = REGISTRY.classes
register_task = REGISTRY.register


def task_names() -> list[str]:
    return REGISTRY.names()


def task_class(name: str) -> type[Task]:
    return REGISTRY.get(name)


def build_task(name: str, options: dict[str, Any]) -> Task:
    return REGISTRY.build(name, options)
