"""Full cache: the reference every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from evalkv.methods.base import Method
from evalkv.methods.registry import register


@register("full")
@dataclass
class FullCache(Method):
    """Full KV cache, nothing evicted. `budget` and `compression_ratio` are ignored."""

    needs_budget = False

    def decode_group_key(self, prompt_length: int):
        """Nothing: the full cache's decode steps read no prompt length, so rows of any lengths may decode together
        (padded to a common length, `Engine._append_fill`)."""
        return None
