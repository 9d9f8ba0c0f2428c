"""LaCache: a ladder-shaped cache (each layer keeps a shifted subset of older tokens) with iterative compaction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.registry import register


def _rungs(start: int, groups: int, group_size: int, keep: int, offset: int, spacing: int = 1) -> list[int]:
    """In each of `groups` groups of `group_size` entries from `start`: `keep` entries `spacing` apart from `offset`."""
    return [start + offset + group_size * g + spacing * k for g in range(groups) for k in range(keep)]


@dataclass
class Ladder:
    """LaCache's index arithmetic for one sample (docs/methods.md#lacache): position-only, deterministic, stateful.

    Tokens `[0, start_size)` are never touched; the ladder region starts at `cursor`. `compact(length)` returns the
    cache indices each layer keeps (the same count in every layer) and advances the cursor.
    """

    num_layers: int
    span: int
    overlap: int
    cache_size: int
    start_size: int
    cursor: int = field(init=False)
    compensated: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.cursor = self.start_size
        if not 0 <= self.overlap < self.span:
            raise EvalkvError(f"lacache: need 0 <= overlap < span, got span={self.span}, overlap={self.overlap}")
        if self.can_reduce < 1:
            raise EvalkvError(
                f"lacache: span {self.span} with overlap {self.overlap} saves nothing on a {self.num_layers}-layer "
                f"model (every layer would keep every token); use a span below the layer count (method.span=...)"
            )
        if self.cache_size - self.start_size - self.num_layers < self.after:
            raise EvalkvError(
                f"lacache: budget {self.cache_size} leaves no ladder room after {self.start_size} start tokens and "
                f"{self.num_layers} layers; raise the budget"
            )

    @property
    def before(self) -> int:
        """Tokens per ladder group."""
        return 1 + math.ceil((self.num_layers - self.span) / (self.span - self.overlap))

    @property
    def after(self) -> int:
        """Tokens each layer keeps per group."""
        return min(math.ceil(self.span / (self.span - self.overlap)), self.before)

    @property
    def can_reduce(self) -> int:
        return self.before - self.after

    def compact(self, length: int) -> list[list[int]] | None:
        """Indices `[layer][k]` each layer keeps of a `length`-entry cache, or None when nothing is evicted."""
        if length <= self.cache_size:
            return None
        if not self.compensated:  # once: match the average size of the reference's ladder
            self.cache_size += self.can_reduce // 2
            self.compensated = True
        to_reduce = length - self.cache_size
        if to_reduce <= 0:
            return None
        room = self.cache_size - self.cursor - self.num_layers
        reducible = max(0, room // self.after) * self.can_reduce
        startover = to_reduce > reducible
        groups = max(0, room // self.after) if startover else math.ceil(to_reduce / self.can_reduce)
        kept = [self._ladder(layer, self.cursor, groups, length) for layer in range(self.num_layers)]
        if not startover:
            self.cursor += self.after * groups
            return kept
        # Startover: re-compact everything after the start tokens with groups widened `times` - 1 more times.
        remaining = to_reduce - reducible
        per_startover = (self.cache_size - self.start_size - self.num_layers) // self.after * self.can_reduce
        times = math.ceil(remaining / per_startover)
        before = self.before + (times - 1) * (self.before - 1)
        groups = math.ceil(remaining / (before - self.after))
        for layer, first in enumerate(kept):
            offset = layer % (before - self.after + 1)
            picks = [
                *range(self.start_size),
                *_rungs(self.start_size, groups, before, self.after, offset, spacing=times),
                *range(self.start_size + before * groups, len(first)),
            ]
            kept[layer] = [first[i] for i in picks]
        self.cursor = self.start_size + self.after * groups
        return kept

    def _ladder(self, layer: int, cursor: int, groups: int, length: int) -> list[int]:
        offset = layer % (self.can_reduce + 1)
        return [
            *range(cursor),
            *_rungs(cursor, groups, self.before, self.after, offset),
            *range(cursor + self.before * groups, length),
        ]


@register("lacache")
@dataclass
class LaCache(Method):
    """LaCache (ladder-shaped KV cache with iterative compaction).

    Based on "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large Language Models", Shi
    et al., ICML 2025 (arXiv 2507.14204), reference code GATECH-EIC/LaCache@0f27c33 (`LaCache` in
    `LongBench/lacache/kv_cache.py`, driver `greedy_generate` in `LongBench/pred.py`).

    After the prompt's (lossless) attention and after every decode step, if the cache exceeds its size, older tokens
    are thinned in a ladder: in groups of `before = 1 + ceil((L - span) / (span - overlap))` tokens, layer l keeps
    `after = min(ceil(span / (span - overlap)), before)` consecutive tokens from offset `l mod (before - after + 1)`,
    so a token lives in about `span` consecutive layers; the first `start_size` tokens and the recent tokens are kept.
    A cursor marks where the next ladder starts; when the room runs out the ladder region is compacted again with
    wider groups ("startover", iterative compaction: older tokens get thinner). All heads of a layer share one set;
    every layer keeps the same number of tokens, different ones (`Ladder` holds the exact index arithmetic).

    Budget: `budget` is the cache size in tokens per layer, start tokens included; the reference takes a fraction of
    the model's maximum prompt length (`cache_size = int(budget * max_length)`). As there, the size grows once by
    `floor((before - after) / 2)` tokens ("compensation to match the average size"), and a compaction may cut up to
    `before - after - 1` tokens below the size (whole groups). Start tokens: `min(start_size, max(1, n - (L + 1)),
    budget - (L + 1))` for an n-token prompt, as the LongBench driver computes them.

    Deviations: keys keep their original RoPE positions; the reference stores keys before RoPE and re-rotates them
    with their cache index at every step (pos-shift, as StreamingLLM). A compaction that would leave nothing to
    reduce after the compensation is skipped (the reference then builds overlapping index ranges). Reproduced as is:
    after two or more startovers with `after >= 2` (overlap > 0), the last rung of some layers lands on the first
    recent token, which that layer then holds twice (attention counts it twice), exactly as the reference's lists.

    span: layers a token spans (paper default 16; the README also uses (9, 3), (9, 7), (14, 0)).
    overlap: overlap between the ladders of consecutive groups.
    start_size: cap on the start tokens (LongBench driver: 128; perplexity runs: 4).
    """

    span: int = 16
    overlap: int = 0
    start_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_size < 1 or not 0 <= self.overlap < self.span:
            raise EvalkvError(f"lacache: need start_size >= 1 and 0 <= overlap < span, got start_size="
                              f"{self.start_size}, span={self.span}, overlap={self.overlap}")

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        state = view.sample.state
        if view.layer_idx == 0:  # one plan per forward, shared by the layers
            ladder = state.get("lacache_ladder") or self._ladder(view)
            state["lacache_ladder"] = ladder
            state["lacache_plan"] = _on_device(ladder.compact(view.length), view.keys.device)
        plan = state["lacache_plan"]
        return None if plan is None else plan[view.layer_idx][None, None, :]

    after_step = compress_prompt  # the ladder compacts again whenever the cache outgrows its size

    def _ladder(self, view: AttentionView) -> Ladder:
        layers = view.geometry.num_layers
        cache_size = self.capacity(view.sample.prompt_length)
        start = min(self.start_size, max(1, view.sample.prompt_length - (layers + 1)), cache_size - (layers + 1))
        if start < 1:
            raise EvalkvError(f"lacache: budget {cache_size} must exceed the layer count + 1 ({layers + 1})")
        return Ladder(layers, self.span, self.overlap, cache_size, start)


def _on_device(plan: list[list[int]] | None, device: torch.device) -> list[Tensor] | None:
    """A forward's plan as one index tensor per layer, copied to the device at once: a host-to-device copy in every
    layer's hook would stall the GPU's queue once per layer."""
    if plan is None:
        return None
    flat = torch.tensor([index for layer in plan for index in layer], dtype=torch.long, device=device)
    return list(flat.split([len(layer) for layer in plan]))

