"""Method configurations the engine-level tests run on tiny models (prompt of 540 tokens, budget well below)."""

import os
import tempfile
from pathlib import Path

BUDGET = 64
# A random-weight learned_mlp policy for the tiny models, written by conftest's session fixture.
TINY_POLICY = Path(tempfile.gettempdir()) / f"evalkv-tests-{os.getpid()}" / "tiny-policy.safetensors"

CASES = {
    "full": {},
    "streaming_llm": {"budget": BUDGET},
    "sliding_window": {"budget": BUDGET},
    "sink_recent_uniform": {"budget": 200, "sink": 32, "recent": 64, "block_size": 16, "chunk_size": 100},
    "sink_recent_uniform-stride": {"sink": 32, "recent": 64, "block_size": 16, "chunk_size": 100,
                                   "uniform_stride": 2},
    "snapkv": {"budget": BUDGET, "window_size": 8},
    "snapkv-query_head": {"budget": BUDGET, "window_size": 8, "granularity": "query_head"},
    "snapkv-avg-pool_then_reduce": {"budget": BUDGET, "window_size": 8, "pooling": "avg",
                                    "gqa_order": "pool_then_reduce", "gqa_reduce": "max"},
    "h2o": {"budget": BUDGET},
    "h2o-query_head": {"budget": BUDGET, "granularity": "query_head", "recent_size": 16},
    "tova": {"budget": BUDGET},
    "kmeans": {"budget": BUDGET, "window_size": 8},
    "kmeans-representative": {"budget": BUDGET, "window_size": 8, "selection": "representative"},
    "kmeans-centroid-decode": {"budget": BUDGET, "window_size": 8, "scoring": "centroid", "cluster_every": 3},
    "learned_mlp": {"budget": BUDGET, "window_size": 8, "policy_path": str(TINY_POLICY)},
    "learned_mlp-chunked": {"budget": BUDGET, "window_size": 8, "chunk_size": 100, "policy_path": str(TINY_POLICY)},
}


def method_name(case: str) -> str:
    return case.split("-")[0]
