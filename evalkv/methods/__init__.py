"""Eviction methods, one per file; importing this package registers the built-ins."""

from evalkv.methods import (  # noqa: F401
    full,
    h2o,
    kmeans,
    learned_mlp,
    sink_recent_uniform,
    sliding_window,
    snapkv,
    streaming_llm,
    tova,
)
from evalkv.methods.registry import METHODS, build_method, method_class, method_names, register

__all__ = ["METHODS", "build_method", "method_class", "method_names", "register"]
