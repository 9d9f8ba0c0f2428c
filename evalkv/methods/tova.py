"""TOVA: drop the token the current query attends to least, averaged over the layer's heads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from evalkv.kv.attention import attention_column_sums
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.registry import register


@register("tova")
@dataclass
class TOVA(Method):
    """TOVA (Token Omission Via Attention).

    Based on "Transformers are Multi-State RNNs", Oren, Hassid et al., EMNLP 2024 (arXiv 2401.06104), reference
    code schwartz-lab-NLP/TOVA@9c7d09b (`TOVACache.reduce`).

    After each attention (the prompt's, then every decode step), if a layer holds more than `budget` tokens it keeps
    the `budget` tokens with the highest attention from the newest query, averaged over all query heads; one set
    for the whole layer, no sink, no recent window, no accumulation. The prompt's own attention is lossless.

    Deviations: none known; ties rank by position.
    """

    evicts_while_decoding = True

    def after_attention(self, view: AttentionView) -> Tensor | None:
        capacity = self.capacity(view.sample.prompt_length)
        if view.length <= capacity:
            return None
        last_row = attention_column_sums(
            view.query[:, :, -1:], view.query_positions[:, -1:], view.keys, view.positions, view.scaling
        )
        return top_k_positions(last_row.mean(dim=1, keepdim=True), capacity)
