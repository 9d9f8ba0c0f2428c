"""TOVA: drop the token the current query attends to least, averaged over the layer's heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from evalkv.kv.attention import attention_column_sums
from evalkv.kv.select import slot_to_evict
from evalkv.kv.slots import SlotView
from evalkv.methods.base import AttentionView
from evalkv.methods.registry import register
from evalkv.methods.scorer import Scorer


@register("tova")
@dataclass
class TOVA(Scorer):
    """TOVA (Token Omission Via Attention), held to the budget at every step.

    A scorer re-applied after every forward (`decode_interval=1`).

    Based on "Transformers are Multi-State RNNs", Oren, Hassid et al., EMNLP 2024 (arXiv 2401.06104), reference
    code schwartz-lab-NLP/TOVA@9c7d09b (`TOVACache.reduce`); docs/methods.md#tova.

    After each attention (the prompt's, then every decode step), if a layer holds more than `budget` tokens it keeps
    the `budget` tokens with the highest attention from the newest query, averaged over all query heads; one set
    for the whole layer, no sink, no recent window, no accumulation. The prompt's own attention is lossless.

    Deviations: the attention row is kept in fp32 (the reference averages it in the model's dtype); ties rank by
    position.
    """

    decode_interval: Optional[int] = 1

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        last_row = attention_column_sums(
            view.query[:, :, -1:], view.query_positions[:, -1:], view.keys, view.positions, view.scaling
        )
        return last_row.mean(dim=1, keepdim=True)[..., :candidates]

    def evict_slot(self, view: SlotView) -> Tensor:
        """The entry the newest query attends to least, averaged over every query head (a fixed-capacity cache's
        step; `decode_interval=1` and no layer or head regime only)."""
        return slot_to_evict(view.probs.mean(dim=1), view.positions[:, 0], view.occupied[:, 0])

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.decode_interval, self.layer_budgets, self.head_budgets) != (1, "uniform", "uniform"):
            self.evict_slot = None  # the general scorer path: eager steps
