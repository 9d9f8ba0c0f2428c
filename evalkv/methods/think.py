"""ThinK: the full cache with its prompt keys thinned channel by channel (`key_channel_ratio` on any prompt-only
method composes it with token eviction)."""

from __future__ import annotations

from dataclasses import dataclass

from evalkv.methods.full import FullCache
from evalkv.methods.registry import register


@register("think", preset_of="full")
@dataclass
class Think(FullCache):
    """ThinK (query-driven key channel pruning, after the prompt), here over the full cache.

    Based on "ThinK: Thinner Key Cache by Query-Driven Pruning", Xu et al., ICLR 2025 (arXiv 2407.21018), reference
    code SalesforceAIResearch/ThinK@d200577 (`ThinK_flash/src/kv_pruning_utils.py` `key_pruner_query_driven`,
    `llama_model.py`, `cache_utils.py`); kvpress 0.5.5's `ThinKPress`; docs/methods.md#think.

    After the prompt's attention in each layer, each head scores its key channels by the last `key_channel_window`
    prompt queries, `mean(q_c^2) * mean(k_c^2)` over the window and the cached entries (the paper's
    `||Q_w[:, c] K[:, c]^T||_F` up to a monotone transform), and the prompt entries but the newest
    `key_channel_recent` keep only their best `head_dim - int(head_dim * key_channel_ratio)` channels: the others
    leave memory (the reference and kvpress keep zeros). Values, and the keys of generated tokens, keep every
    channel. `method=snapkv budget=... method.key_channel_ratio=0.4` is ThinK over SnapKV (any method that
    compresses the prompt only takes the option; eviction runs first, then the kept entries are thinned).

    Deviations: the channels leave memory (the reference rebuilds full-width keys with zeros at every decode step,
    kvpress keeps them zeroed); one channel set per KV head from the group's mean query norms (kvpress; the reference
    repeats the keys per query head and chooses per query head, which a query-head cache of SnapKV-like methods,
    `granularity=query_head`, does); ties by channel index (the reference's `topk` leaves them undefined); fp32
    scores; decode steps run eagerly (not through CUDA graphs), batched where the caches' shapes allow.

    key_channel_ratio: the fraction of channels dropped (reference `pruning_ratio`, its LongBench setting 0.4).
    """

    key_channel_ratio: float = 0.4
