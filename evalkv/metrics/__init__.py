"""Benchmark metrics; importing this package registers them."""

from evalkv.metrics import longbench, longbench_v2, longgenbench, needle, passkey, perplexity, reasoning, ruler  # noqa: F401
from evalkv.metrics.registry import METRICS, metric_for, score_records

__all__ = ["METRICS", "metric_for", "score_records"]
