"""ChunkKV: SnapKV's scores, kept in whole chunks of consecutive tokens shared by the layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from evalkv.methods.registry import register
from evalkv.methods.snapkv import SnapKV


@register("chunkkv", preset_of="snapkv")
@dataclass
class ChunkKV(SnapKV):
    """ChunkKV (chunk-level selection over SnapKV's window scores, prompt only).

    SnapKV with `chunk_length=10` and kvpress's SnapKV scoring (average pooling, kernel 5, pooled per query head then
    averaged); `chunk_length` is a regime of every scorer (docs/methods.md#regimes), so `method=knorm
    method.chunk_length=10` chunks Knorm's scores, as kvpress's `ChunkKVPress` wraps any `ScorerPress`.

    Based on "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference", Liu et al.,
    NeurIPS 2025 (arXiv 2502.00299), reference code kvpress 0.5.5 (`ChunkKVPress` over `SnapKVPress`,
    `kvpress/presses/chunkkv_press.py`; the paper points to kvpress for its code); docs/methods.md#chunkkv.

    After the prompt's attention, the prefix before the observation window is cut into chunks of `chunk_length`
    tokens from the first token (the last chunk may be shorter); a chunk scores the mean of its tokens' SnapKV scores
    summed over the KV heads; the layer keeps the window and whole chunks in score order up to `budget` entries,
    one set for all heads (`budgets.chunk_selection`).

    Deviations: the chunk that would overflow the budget is filled with its best tokens, so every layer holds
    exactly `budget` entries (the paper keeps `floor((budget - window) / chunk_length)` whole chunks, kvpress
    `int(chunks * (1 - ratio))` whole chunks over the whole cache with the window's chunks scored highest). The
    chunk grid covers the prefix only (kvpress lays it over the whole cache, window included). Each batch row
    chooses its own chunks (kvpress applies the first row's to every row). No layer-wise index reuse (the paper's
    optional speed-up, which reuses one layer's chunks in the next). fp32 scores; ties by chunk index.

    chunk_length: tokens per chunk (paper B.4: 10; kvpress's default 20).
    kernel_size, pooling, gqa_order: kvpress `SnapKVPress`'s 5, `avg`, `pool_then_reduce` (its window is 64: set
        `window_size=64` to match it; 32 here, SnapKV's paper setting).
    """

    chunk_length: Optional[int] = 10
    kernel_size: int = 5
    pooling: str = "avg"
    gqa_order: str = "pool_then_reduce"
