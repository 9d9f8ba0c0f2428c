"""AdaKV: SnapKV scores with the layer's budget shared adaptively among its heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView
from evalkv.methods.pyramidkv import pyramid_prefix_budgets
from evalkv.methods.registry import register
from evalkv.methods.snapkv import SnapKV


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


@register("adakv")
@dataclass
class AdaKV(SnapKV):
    """Ada-SnapKV (adaptive per-head budgets within each layer, prompt only).

    Based on "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
    Feng et al. (arXiv 2407.11550), reference code FFY0/AdaKV@efe4e2e (`AdaptiveSnapKVCluster.update_kv`).

    Scores as SnapKV (window attention summed over the window rows, the mean in the reference: same ranking, pooled).
    Per layer, with `base = budget - window_size` prefix tokens per head on average: the `heads * base` best scores
    of all heads decide how many each head gets (`adaptive_head_budgets`, floor `floor_alpha`); each head keeps that
    many best prefix tokens plus the window. Heads keep different numbers of entries and the cache stores them per
    head (memory falls head by head; nothing is masked). `pyramid=True` gives Ada-PyramidKV (per-layer `base` from
    PyramidKV's formula). The first `skip_layers` layers use the uniform `base`.

    Deviations: GQA granularity as SnapKV (KV head with `gqa_reduce` before pooling by default, the reference's
    `gqa_support` mode; `query_head` is the reference's MHA mode). Ties rank by position.

    floor_alpha: share of the budget every head keeps (reference CLI default 0.2).
    normalize: scale each head's scores by the mass in its top `base` before the global ranking.
    """

    floor_alpha: float = 0.2
    normalize: bool = False
    skip_layers: int = 0
    pyramid: bool = False
    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise EvalkvError(f"adakv: floor_alpha must be in [0, 1], got {self.floor_alpha}")
        if self.skip_layers < 0 or self.beta < 1:
            raise EvalkvError("adakv: skip_layers must be >= 0 and beta >= 1")

    def layer_capacity(self, view: AttentionView) -> int | None:
        capacity = self.capacity(view.length)
        if not self.pyramid or view.length < capacity:
            return capacity
        budgets = pyramid_prefix_budgets(
            capacity - self.window_size, self.window_size, view.length, view.geometry.num_layers, self.beta
        )
        return budgets[view.layer_idx] + self.window_size

    def select(self, view: AttentionView, scores: Tensor, keep: int) -> list[Tensor]:
        if scores.shape[0] != 1:
            raise EvalkvError("adakv keeps a different number of tokens per head and needs batch size 1")
        heads = scores[0]
        if view.layer_idx < self.skip_layers:
            budgets = [keep] * heads.shape[0]
        else:
            budgets = adaptive_head_budgets(heads, keep, self.floor_alpha, self.normalize)
        window = torch.arange(heads.shape[-1], view.length, device=heads.device)
        return [
            torch.cat([top_k_positions(head, budget), window]) for head, budget in zip(heads, budgets)
        ]
