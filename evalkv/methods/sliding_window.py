"""Sliding window: the most recent tokens only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from evalkv.kv.select import keep_sink_and_recent, slot_to_evict
from evalkv.kv.slots import SlotView
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.registry import register


@register("sliding_window")
@dataclass
class SlidingWindow(Method):
    """Sliding window: keep the last `budget` tokens (no sinks), after the prompt and after every decode step.

    Based on seed 004's `SlidingWindowCache` (suhasramanand/kv-cache-compression@f74221a,
    `kv_cache_compression.ipynb`; docs/methods.md#sliding_window). Deviation: eviction runs after the step's
    attention (the seed evicts inside `update()`, before it), as every other decode-time method here does.
    """

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        capacity = self.capacity(view.sample.prompt_length)
        if view.length <= capacity:
            return None
        return keep_sink_and_recent(view.length, 0, capacity, view.keys.device)

    after_step = compress_prompt

    def evict_slot(self, view: SlotView) -> Tensor:
        """The oldest entry (a fixed-capacity cache's step)."""
        return slot_to_evict(view.positions.float(), view.positions, view.occupied)[:, :1]
