"""LRU: keep the tokens that were read (attended above the uniform level) most recently."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from evalkv.kv.attention import attention_last_reads
from evalkv.kv.select import keep_sink_and_recent, top_k_positions
from evalkv.methods.base import AttentionView, Method, require_choice
from evalkv.methods.registry import register

ACCESS = "lru_last_access"


@register("lru")
@dataclass
class LRU(Method):
    """LRU (least recently used eviction), held to the budget at every step.

    Based on seed 004 (`LRUCache` in suhasramanand/kv-cache-compression@f74221a, `kv_cache_compression.ipynb`) and
    the access rule evalkv chose (docs/methods.md#lru); no paper.

    Every token has a last-access time, initially its own position. A query at position t *reads* a cached token
    when its attention to it, averaged over the layer's query heads, exceeds the uniform level `1 / (number of keys
    the query sees)`; the token's access time becomes t. After each forward's attention (the prompt's, then every
    decode step), if the layer holds more than `budget` tokens it keeps the `budget` most recently accessed ones
    (ties: the newer position wins); access times travel with the kept entries. The current token was accessed now,
    so it is always kept.

    Prompt-time rule: every prompt query's row counts as an access at its position (what an LRU watching each
    attention read of the prompt would record); the rows are recomputed block by block after the prompt's lossless
    attention (`attention_last_reads`: one extra attention pass, class F at prefill like H2O's accumulation; class R1
    while decoding).

    Deviations from the seed: the seed never refreshes a timestamp after insertion, so its "LRU" is a FIFO, i.e. the
    sliding window; `refresh=insert` reproduces that (the same selection as `sliding_window`). The seed evicts inside
    `update()`, before the step's attention; here eviction follows the attention, as for every decode-time method.

    refresh: `attention` (accesses refresh the time, default) or `insert` (insertion time only, the seed's FIFO).
    granularity: `layer` (one ranking from the mean over all query heads, default) or `kv_head` (one per KV head,
        reads judged on the mean over the head's GQA group).
    """

    refresh: str = "attention"
    granularity: str = "layer"

    reads_row_lse: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self.name, "refresh", self.refresh, ("attention", "insert"))
        require_choice(self.name, "granularity", self.granularity, ("layer", "kv_head"))

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        capacity = self.capacity(view.sample.prompt_length)
        if self.refresh == "insert":
            return None if view.length <= capacity else keep_sink_and_recent(view.length, 0, capacity, view.keys.device)
        access = self._update_access_times(view)
        if view.length <= capacity:
            return None
        positions = view.positions[:, : access.shape[1]]
        recency = access * (int(positions.max()) + 1) + positions  # access time first, then the newer position
        return top_k_positions(recency, capacity)

    after_step = compress_prompt  # the same refresh and cut after every decode step

    def _update_access_times(self, view: AttentionView) -> Tensor:
        heads = 1 if self.granularity == "layer" else view.cache.num_heads
        access = view.positions[:, :heads].clone()  # new entries: inserted now
        previous = view.cache.extras.get(ACCESS)
        if previous is not None:
            access[..., : previous.shape[-1]] = previous
        reads = attention_last_reads(view.query, view.query_positions, view.keys, view.positions, view.scaling, heads,
                                     row_lse=view.row_lse)
        access = torch.maximum(access, reads)
        view.cache.extras[ACCESS] = access
        return access
