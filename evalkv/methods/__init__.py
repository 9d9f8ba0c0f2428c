"""Eviction methods, one per file; importing this package registers the built-ins."""

from evalkv.methods import (  # noqa: F401  (importing a method module registers it)
    adakv,
    catekv,
    chunkkv,
    duo_attention,
    expected_attention,
    full,
    h2o,
    keydiff,
    kmeans,
    knorm,
    kvzip,
    lacache,
    laq,
    learned_mlp,
    lru,
    obcache,
    pyramidkv,
    rkv,
    segment_two_stage,
    sink_recent_uniform,
    sliding_window,
    snapkv,
    streaming_llm,
    think,
    tova,
)
from evalkv.methods.registry import METHODS, build_method, method_class, method_names, register

__all__ = ["METHODS", "build_method", "method_class", "method_names", "register"]
