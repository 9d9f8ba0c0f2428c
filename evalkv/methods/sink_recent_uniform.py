"""Sink + recent tokens, optionally with uniformly spread 128-token blocks of the middle (seed 001)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.methods.base import AttentionView, Method, require_choice
from evalkv.methods.registry import register


def sink_recent_uniform_keep(
    length: int, sink: int, recent: int, middle_strategy: str, middle_budget: int, stride: int, block_size: int
) -> list[int] | None:
    """Cache indices kept by seed 001's `build_simple_keep_token_idx`, or None to keep everything.

    Middle blocks are aligned to multiples of `block_size` in cache-index space; partial blocks next to the sink and
    the recent window are dropped. Stride mode keeps every `stride`-th block; budget mode keeps `middle_budget //
    block_size` blocks (at least one) at `floor(linspace(0, n_mid - 1, k))`, first and last middle blocks included.
    """
    if length <= sink + recent:
        return None
    sink_end = min(length, sink)
    recent_start = max(0, length - recent)
    kept = set(range(sink_end)) | set(range(recent_start, length))
    if middle_strategy == "uniform":
        first, last = math.ceil(sink_end / block_size), recent_start // block_size
        count = last - first
        if count > 0:
            if stride > 0:
                blocks = list(range(first, last, stride))
            else:
                wanted = max(1, middle_budget // block_size)
                if wanted >= count:
                    blocks = list(range(first, last))
                else:
                    # float32 linspace truncated by .long(), exactly as the seed computes it
                    blocks = (first + torch.linspace(0, count - 1, wanted).long()).tolist()
            for block in blocks:
                kept.update(range(block * block_size, (block + 1) * block_size))
    return sorted(kept)


@register("sink_recent_uniform")
@dataclass
class SinkRecentUniform(Method):
    """Sink + recent (+ uniform middle blocks), evicted between chunks of a chunked prefill.

    Based on seed 001 (a LaCache-derived project; public copy paper-review-artifact/review-code@30ccff2,
    `kv_eviction/eviction.py`, `streaming.py`); docs/methods.md#sink_recent_uniform.

    The prompt is fed in chunks of `prefill_chunk`; after each chunk, if a layer holds more than the cache target, it
    keeps the first `sink` and last `recent` entries and, with `middle_strategy=uniform`, whole `block_size` blocks of
    the middle (aligned to cache-index multiples of `block_size`), chosen evenly (budget mode: `budget - sink -
    recent` tokens' worth) or every `uniform_stride`-th block (stride mode). The block grid is re-laid on the
    compacted cache at every eviction, as in the seed. No eviction while decoding. Same set for all layers and heads.

    budget: the cache target in budget mode (sink + recent + middle tokens); not used in stride mode or with
    `middle_strategy=none` (target = sink + recent).

    Deviations: keys keep their original RoPE positions (the seed's `rope_mode="abs"`); its cache-slot positions
    mode is not provided.
    """

    sink: int = 256
    recent: int = 512
    middle_strategy: str = "uniform"
    uniform_stride: int = 0
    block_size: int = 128
    prefill_chunk: Optional[int] = 512

    def __post_init__(self) -> None:
        require_choice("sink_recent_uniform", "middle_strategy", self.middle_strategy, ("none", "uniform"))
        super().__post_init__()
        if min(self.sink, self.recent, self.uniform_stride) < 0 or self.block_size < 1:
            raise EvalkvError("sink_recent_uniform: sink, recent, uniform_stride >= 0 and block_size >= 1")
        if self.requires_budget() and self.budget is not None and self.budget < self.sink + self.recent:
            raise EvalkvError(
                f"sink_recent_uniform: budget {self.budget} is below sink {self.sink} + recent {self.recent}; "
                "lower them too, e.g. method.sink=32 method.recent=64"
            )

    def requires_budget(self) -> bool:
        return self.middle_strategy == "uniform" and self.uniform_stride == 0

    def cache_target(self, prompt_length: int) -> int:
        if self.requires_budget():
            return max(self.capacity(prompt_length), self.sink + self.recent)
        return self.sink + self.recent

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        target = self.cache_target(view.sample.prompt_length)
        if view.length <= target:
            return None
        middle = target - self.sink - self.recent
        return _kept_indices(view.length, self.sink, self.recent, self.middle_strategy, middle, self.uniform_stride,
                             self.block_size, view.keys.device)


@functools.lru_cache(maxsize=256)
def _kept_indices(length: int, sink: int, recent: int, middle_strategy: str, middle_budget: int, stride: int,
                  block_size: int, device: torch.device) -> Tensor | None:
    """`sink_recent_uniform_keep` as a `[1, 1, k]` index tensor on `device`, made once per cache length: a chunked
    prefill evicts at the same lengths chunk after chunk and layer after layer, and a fresh host-to-device copy in
    every layer's hook would stall the GPU's queue each time (read-only: `LayerCache.keep` only gathers with it)."""
    kept = sink_recent_uniform_keep(length, sink, recent, middle_strategy, middle_budget, stride, block_size)
    return None if kept is None else torch.tensor(kept, device=device)[None, None, :]
