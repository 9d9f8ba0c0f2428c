"""Method configurations the engine-level tests run on tiny models (prompt of 540 tokens, budget well below)."""

BUDGET = 64

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
}


def method_name(case: str) -> str:
    return case.split("-")[0]
