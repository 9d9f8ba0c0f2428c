"""How a budget is shared out: per layer (PyramidKV's schedules), per head (AdaKV's adaptive allocation) and in
whole chunks of consecutive entries (ChunkKV).

Any scorer (evalkv/methods/scorer.py) takes these through its `layer_budgets`, `head_budgets` and `chunk_length`
options (docs/methods.md#regimes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from evalkv.kv.select import top_k_by_group, top_k_positions

LAYER_SCHEDULES = ("uniform", "pyramid", "ada_pyramid")
HEAD_ALLOCATIONS = ("uniform", "adaptive")


def pyramid_prefix_budgets(base: int, window: int, length: int, num_layers: int, beta: int) -> list[int]:
    """Prefix tokens each layer keeps (window excluded) for an average of `base`, as KVCache-Factory computes them.

    `min = base // beta`, `max = 2 base - min`, clamped to the prefix length `length - window` (then `min` is
    re-derived so the mean stays `base`); layer l keeps `max - l * ((max - min) // (L - 1))`.
    """
    smallest = base // beta
    largest = 2 * base - smallest
    if largest >= length - window:
        largest = length - window
        smallest = 2 * base - largest
    steps = (largest - smallest) // (num_layers - 1) if num_layers > 1 else 0
    return [largest - layer * steps for layer in range(num_layers)]


def layer_capacity(schedule: str, capacity: int, window: int, length: int, num_layers: int, layer: int,
                   beta: int) -> int | None:
    """Entries layer `layer` keeps per head (window included) of a `length`-entry cache whose layers average
    `capacity`; None leaves the layer alone.

    uniform: `capacity` in every layer. pyramid (PyramidKV, KVCache-Factory `PyramidKVCluster`): a cache shorter than
    the capacity is left alone, one shorter than `2 (capacity - window)` gets the uniform capacity, otherwise
    `window + pyramid_prefix_budgets(...)[layer]`. ada_pyramid (Ada-Pyramid, FFY0/AdaKV): the pyramid from the first
    length that reaches the capacity, with no uniform middle range.
    """
    if schedule == "uniform":
        return capacity
    if schedule == "pyramid" and length < capacity:
        return None
    if length < capacity or (schedule == "pyramid" and length < 2 * (capacity - window)):
        return capacity
    return pyramid_prefix_budgets(capacity - window, window, length, num_layers, beta)[layer] + window


def adaptive_head_budgets(scores: Tensor, base: int, floor_alpha: float, normalize: bool) -> list[int]:
    """Prefix tokens each head keeps from one layer's scores `[h, n]` (batch 1), AdaKV's allocation.

    The `h * base` best scores over all heads give each head a count `c`; the head keeps
    `round(c (1 - alpha) + int(base alpha))`. With `normalize`, each head's scores are first scaled by the share of
    its mass in its own top `base`.
    """
    if normalize:
        top = scores.sort(dim=-1, descending=True).values
        scores = scores * (top[:, :base].sum(-1, keepdim=True) / top.sum(-1, keepdim=True))
    heads, length = scores.shape
    best = top_k_positions(scores.reshape(1, 1, -1), heads * base)[0, 0]
    counts = torch.bincount(best // length, minlength=heads).float()  # float32, half-to-even rounding: the reference
    floor = int(base * floor_alpha)
    return [min(length, int(c)) for c in torch.round(counts * (1 - floor_alpha) + floor).tolist()]


def chunk_selection(scores: Tensor, chunk_length: int, keep: int) -> Tensor:
    """`keep` of the candidates scored `[B, h, c]`, taken in whole chunks, one set for the layer (ChunkKV,
    docs/methods.md#chunkkv): `[B, 1, keep]` ascending.

    The candidates are cut into chunks of `chunk_length` consecutive entries from the first (the last chunk may be
    shorter). The scores are summed over the selection heads and a chunk scores the mean over its entries, as
    kvpress's `ChunkKVPress` computes them; whole chunks are taken in (score desc, index asc) order and the chunk
    that would overflow `keep` is filled with its best entries (`top_k_by_group`).
    """
    batch, _, length = scores.shape
    summed = scores.sum(dim=1, keepdim=True)
    chunks = torch.arange(length, device=scores.device) // chunk_length
    count = -(-length // chunk_length)
    sums = summed.new_zeros(batch, 1, count).index_add_(-1, chunks, summed)
    sizes = torch.bincount(chunks, minlength=count).to(summed.dtype)
    return top_k_by_group(summed, chunks.expand(batch, 1, length), sums / sizes, keep)
