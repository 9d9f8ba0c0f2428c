"""LongBench v1, LongBench-E and MiniLongBench (specs/benchmarks.md §A); importing this registers the tasks."""

from evalkv.tasks.longbench.mini import MiniLongBench
from evalkv.tasks.longbench.task import LongBench

__all__ = ["LongBench", "MiniLongBench"]
