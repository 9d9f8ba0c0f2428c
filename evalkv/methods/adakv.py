"""AdaKV: SnapKV scores with the layer's budget shared adaptively among its heads."""

from __future__ import annotations

from dataclasses import dataclass

from evalkv.methods.registry import register
from evalkv.methods.snapkv import SnapKV


@register("adakv")
@dataclass
class AdaKV(SnapKV):
    """Ada-SnapKV (adaptive per-head budgets within each layer, prompt only).

    SnapKV with `head_budgets=adaptive`.

    Based on "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
    Feng et al. (arXiv 2407.11550), reference code FFY0/AdaKV@efe4e2e (`AdaptiveSnapKVCluster.update_kv`);
    docs/methods.md#adakv.

    Scores as SnapKV (window attention averaged over the window rows, summed in the reference: same ranking, pooled).
    Per layer, with `base = budget - window_size` prefix tokens per head on average: the `heads * base` best scores
    of all heads decide how many each head gets (`adaptive_head_budgets` in evalkv/methods/budgets.py, floor
    `floor_alpha`); each head keeps that many best prefix tokens plus the window. Heads keep different numbers of
    entries and the cache stores them per head (memory falls head by head; nothing is masked).
    `layer_budgets=ada_pyramid` gives Ada-PyramidKV (per-layer `base` from PyramidKV's formula). The first
    `skip_layers` layers use the uniform `base`.

    Deviations: GQA granularity as SnapKV (KV head with `gqa_reduce` before pooling by default, the reference's
    `gqa_support` mode; `query_head` is the reference's MHA mode); fp32 scores as SnapKV. Ties rank by position.

    floor_alpha: share of the budget every head keeps (reference CLI default 0.2).
    normalize: scale each head's scores by the mass in its top `base` before the global ranking.
    """

    head_budgets: str = "adaptive"
