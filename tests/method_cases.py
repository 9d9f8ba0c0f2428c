"""Method configurations the engine-level tests run on tiny models (prompt of 540 tokens, budget well below)."""

import os
import tempfile
from pathlib import Path

BUDGET = 64
MIXED_HEADMASK = str(Path(__file__).parent / "data" / "headmask_mixed.csv")  # tiny models: 2 layers x 2 KV heads
# DuoAttention gates for the tiny models (2 layers x 2 KV heads) and a config.json with sink 16 and recent 64.
DUO_PATTERN = str(Path(__file__).parent / "data" / "duo_pattern_tiny")
# A random-weight learned_mlp policy for the tiny models, written by conftest's session fixture.
TINY_POLICY = Path(tempfile.gettempdir()) / f"evalkv-tests-{os.getpid()}" / "tiny-policy.safetensors"

CASES = {
    "full": {},
    "streaming_llm": {"budget": BUDGET},
    "sliding_window": {"budget": BUDGET},
    "sink_recent_uniform": {"budget": 200, "sink": 32, "recent": 64, "block_size": 16, "prefill_chunk": 100},
    "sink_recent_uniform-stride": {"sink": 32, "recent": 64, "block_size": 16, "prefill_chunk": 100,
                                   "uniform_stride": 2},
    "snapkv": {"budget": BUDGET, "window_size": 8},
    "snapkv-query_head": {"budget": BUDGET, "window_size": 8, "granularity": "query_head"},
    "snapkv-critical": {"budget": BUDGET, "window_size": 8, "critical": True},
    "adakv-critical": {"budget": BUDGET, "window_size": 8, "critical": True},
    "snapkv-decoding": {"budget": BUDGET, "window_size": 8, "decode_interval": 3, "decode_buffer": 5},
    "snapkv-avg-pool_then_reduce": {"budget": BUDGET, "window_size": 8, "pooling": "avg",
                                    "gqa_order": "pool_then_reduce", "gqa_reduce": "max"},
    "h2o": {"budget": BUDGET},
    "h2o-chunked": {"budget": BUDGET, "prefill_chunk": 100},
    "h2o-query_head": {"budget": BUDGET, "granularity": "query_head", "recent_size": 16},
    "tova": {"budget": BUDGET},
    "pyramidkv": {"budget": BUDGET, "window_size": 8},
    "pyramidkv-query_head": {"budget": 200, "window_size": 8, "granularity": "query_head"},
    "adakv": {"budget": BUDGET, "window_size": 8},
    "adakv-query_head-pyramid": {"budget": BUDGET, "window_size": 8, "granularity": "query_head",
                                 "layer_budgets": "ada_pyramid", "normalize": True},
    "segment_two_stage": {"budget": BUDGET, "window_size": 8, "coarse_budget": 200},
    "segment_two_stage-kv_head-v2": {"budget": BUDGET, "window_size": 8, "coarse_budget": 200, "lookahead_steps": 3,
                                     "granularity": "kv_head", "stage2_queries": "lookahead"},
    "obcache": {"budget": BUDGET},
    "obcache-kv_head-prompt_only": {"budget": BUDGET, "granularity": "kv_head", "decode_evict": False},
    "kvcV+tova": {"budget": BUDGET},
    "kvcK_fullhist": {"budget": BUDGET},
    "kvcV_p1+maxpool": {"budget": BUDGET, "num_recent": 8},
    "lacache": {"budget": BUDGET, "span": 1, "start_size": 4},
    "lru": {"budget": BUDGET},
    "lru-kv_head": {"budget": BUDGET, "granularity": "kv_head"},
    "knorm": {"budget": BUDGET},
    "knorm-pyramid-chunked": {"budget": BUDGET, "layer_budgets": "pyramid", "prefill_chunk": 200},
    "duo_attention": {"patterns": DUO_PATTERN},
    "duo_attention-on_the_fly": {"sink_size": 16, "recent_size": 64},
    "duo_attention-all_streaming": {"patterns": DUO_PATTERN, "head_compression_ratio": 1.0},
    "kvzip": {"budget": BUDGET, "chunk_size": 200},
    "kvzip-layerwise": {"budget": BUDGET, "layerwise": True, "n_sink": 0},
    "catekv": {"budget": 96, "init_tokens": 16, "recent_tokens": 32, "headmask_path": MIXED_HEADMASK},
    "kmeans": {"budget": BUDGET, "window_size": 8},
    "kmeans-representative": {"budget": BUDGET, "window_size": 8, "selection": "representative"},
    "kmeans-centroid-decode": {"budget": BUDGET, "window_size": 8, "scoring": "centroid", "cluster_every": 3},
    "learned_mlp": {"budget": BUDGET, "window_size": 8, "policy_path": str(TINY_POLICY)},
    "learned_mlp-chunked": {"budget": BUDGET, "window_size": 8, "prefill_chunk": 100, "policy_path": str(TINY_POLICY)},
    "expected_attention": {"budget": BUDGET, "n_future_positions": 16},
    "expected_attention-decoding": {"budget": BUDGET, "n_future_positions": 16, "decode_interval": 3,
                                    "decode_buffer": 5, "use_vnorm": False},
    "keydiff": {"budget": BUDGET},
    "chunkkv": {"budget": BUDGET, "window_size": 8},
    "laq": {"budget": BUDGET, "lookahead_steps": 3, "lookahead_budget": 200, "lookahead_window": 16},
    "rkv": {"budget": BUDGET, "window_size": 4, "decode_interval": 4, "decode_buffer": 4},
}


# Methods whose engine support is not merged yet: every test of their cases is expected to fail until it is.


def method_name(case: str) -> str:
    return case.split("-")[0]
