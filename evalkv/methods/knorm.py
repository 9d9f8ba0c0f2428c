"""Knorm: keep the prompt tokens whose keys have the lowest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from evalkv.methods.base import AttentionView
from evalkv.methods.registry import register
from evalkv.methods.scorer import Scorer


@register("knorm")
@dataclass
class Knorm(Scorer):
    """Knorm (key-norm eviction, prompt only).

    Based on "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", Devoto et al., EMNLP 2024
    (arXiv 2406.11430), reference code NVIDIA/kvpress@8bb29b9 (`KnormPress`, a `ScorerPress`); docs/methods.md#knorm.

    After the prompt's attention in each layer, if the prompt has more than `budget` tokens, each KV head keeps the
    `budget` tokens with the smallest key norm `||k_j||_2` (keys after RoPE, as cached) and frees the rest. No window,
    no sinks: every prompt token competes, as in kvpress. Generated tokens are appended, never evicted. Needs no
    attention scores.

    Deviations: norms in fp32 (kvpress ranks in the model dtype, where bf16 norms tie more often); ties rank by
    position; kept entries are stored in position order. With `compression_ratio`, the kept count is
    `max(1, int(n * (1 - ratio)))` (kvpress's `ScorerPress` keeps `int(n * (1 - ratio))`, which is 0 for a ratio
    close to 1; evalkv keeps at least one entry, as for every method).
    """

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        return -view.keys[..., :candidates, :].float().norm(dim=-1)
