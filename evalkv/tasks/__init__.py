"""Benchmark tasks; importing this package registers the built-ins."""

from evalkv.tasks import longbench, longbench_v2, needle, passkey, perplexity, reasoning, ruler  # noqa: F401
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.registry import TASKS, build_task, register_task, task_class, task_names

__all__ = ["TASKS", "Sample", "Task", "build_task", "register_task", "task_class", "task_names"]
