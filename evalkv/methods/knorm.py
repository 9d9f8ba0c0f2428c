"""Knorm: keep the prompt tokens whose keys have the lowest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView, Method, Phase
from evalkv.methods.registry import register


@register("knorm")
@dataclass
class Knorm(Method):
    """Knorm (key-norm eviction, prompt only).

    Based on "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", Devoto et al., EMNLP 2024
    (arXiv 2406.11430), reference code NVIDIA/kvpress@8bb29b9 (`KnormPress`, a `ScorerPress`).

    After the prompt's attention in each layer, if the prompt has more than `budget` tokens, each KV head keeps the
    `budget` tokens with the smallest key norm `||k_j||_2` (keys after RoPE, as cached) and frees the rest. No window,
    no sinks: every prompt token competes, as in kvpress. Generated tokens are appended, never evicted. Needs no
    attention scores (class K, specs/methods.md §0.7).

    Deviations: norms in fp32 (kvpress ranks in the model dtype, where bf16 norms tie more often); ties rank by
    position (specs/methods.md §0.6); kept entries are stored in position order. With `compression_ratio`, the kept
    count is `max(1, int(n * (1 - ratio)))`, as kvpress's `ScorerPress`.
    """

    def after_attention(self, view: AttentionView) -> Tensor | None:
        if view.phase is not Phase.PREFILL or not view.sample.last_chunk:
            return None
        capacity = self.capacity(view.length)
        if view.length <= capacity:
            return None
        return top_k_positions(-view.keys.float().norm(dim=-1), capacity)
