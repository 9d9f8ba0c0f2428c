"""PyramidKV: SnapKV's selection with layer budgets that shrink from the bottom layers to the top."""

from __future__ import annotations

from dataclasses import dataclass

from evalkv.methods.registry import register
from evalkv.methods.snapkv import SnapKV


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (layer-wise arithmetic budgets over SnapKV scoring, prompt only).

    SnapKV with `layer_budgets=pyramid` and KVCache-Factory's window.

    Based on "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", Cai et al.
    (arXiv 2406.02069), reference code Zefan-Cai/KVCache-Factory@c97f9d7 (`PyramidKVCluster.update_kv`);
    docs/methods.md#pyramidkv.

    `budget` is the average per layer (window included). A prompt shorter than the budget is left alone; one
    shorter than `2 (budget - window)` gets SnapKV's uniform budget in every layer; otherwise layer l keeps
    `window + pyramid_prefix_budgets(...)[l]` tokens per head, lower layers more (evalkv/methods/budgets.py).
    Scoring and selection are SnapKV's (see its docstring, including the GQA granularity deviation). Layers hold
    different lengths; memory falls layer by layer.

    Deviations: GQA granularity and fp32 scores as SnapKV (KV head by default; the reference selects per query head
    by default, and has an opt-in per-KV-head mode that sums, reduces, then pools).

    window_size: 8 (KVCache-Factory's LongBench setting). beta: 20.
    """

    window_size: int = 8
    layer_budgets: str = "pyramid"
