"""PyramidKV: SnapKV's selection with layer budgets that shrink from the bottom layers to the top."""

from __future__ import annotations

from dataclasses import dataclass

from evalkv.errors import EvalkvError
from evalkv.methods.base import AttentionView
from evalkv.methods.registry import register
from evalkv.methods.snapkv import SnapKV


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


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (layer-wise arithmetic budgets over SnapKV scoring, prompt only).

    Based on "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", Cai et al.
    (arXiv 2406.02069), reference code Zefan-Cai/KVCache-Factory@c97f9d7 (`PyramidKVCluster.update_kv`).

    `budget` is the average per layer (window included). A prompt shorter than the budget is left alone; one
    shorter than `2 (budget - window)` gets SnapKV's uniform budget in every layer; otherwise layer l keeps
    `window +` `pyramid_prefix_budgets(...)[l]` tokens per head, lower layers more. Scoring and selection are
    SnapKV's (see its docstring, including the GQA granularity deviation). Layers hold different lengths; memory
    falls layer by layer.

    Deviations: GQA granularity as SnapKV (KV head by default; the reference selects per query head).

    window_size: 8 (KVCache-Factory's LongBench setting). beta: 20.
    """

    window_size: int = 8
    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise EvalkvError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def layer_capacity(self, view: AttentionView) -> int | None:
        length, capacity = view.length, self.capacity(view.length)
        if length < capacity:
            return None
        if length < 2 * (capacity - self.window_size):
            return capacity
        budgets = pyramid_prefix_budgets(
            capacity - self.window_size, self.window_size, length, view.geometry.num_layers, self.beta
        )
        return budgets[view.layer_idx] + self.window_size
