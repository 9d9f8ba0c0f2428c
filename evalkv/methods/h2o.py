"""H2O: heavy hitters (accumulated attention) plus recent tokens, held to the budget at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_column_sums, reduce_query_heads
from evalkv.kv.select import keep_best_and_tail, slot_to_evict
from evalkv.kv.slots import SlotView
from evalkv.methods.base import AttentionView, Method, require_choice
from evalkv.methods.registry import register

SCORE = "h2o_accumulated_attention"


@register("h2o")
@dataclass
class H2O(Method):
    """H2O (Heavy-Hitter Oracle).

    Based on "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", Zhang et al.,
    NeurIPS 2023 (arXiv 2306.14048), reference code FMInference/H2O@ac75c2a (`H2OKVCache_LayerWise`, real drop).

    Every forward adds, for each cached token, the attention it receives summed over the forward's queries (the
    prompt contributes the column sums of its whole causal attention matrix, computed block by block; each decode
    step adds one row). After the forward's attention, if the cache exceeds `budget`, each head keeps the last
    `recent_size` tokens and the `budget - recent_size` others with the highest accumulated score; scores travel
    with the kept entries. The prompt's own attention is lossless; the budget is a hard cap while decoding.

    Deviations: scores accumulate in fp32 per sample (the reference sums probabilities in the model's dtype, over
    the batch); on GQA models one selection per KV head from the group's mean (or max) accumulated score
    (`granularity=query_head` keeps one per query head, the reference being MHA-only). `recent_size` defaults to
    half the budget (the reference's lm-eval runs use equal heavy and recent ratios). Ties rank by position.

    recent_size: recent tokens always kept (default: budget // 2).
    granularity: `kv_head` (default) or `query_head`.
    gqa_reduce: `mean` or `max` over the query heads of a KV head.
    """

    recent_size: Optional[int] = None
    granularity: str = "kv_head"
    gqa_reduce: str = "mean"

    reads_row_lse: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self.name, "granularity", self.granularity, ("kv_head", "query_head"))
        require_choice(self.name, "gqa_reduce", self.gqa_reduce, ("mean", "max"))
        if self.recent_size is not None and self.recent_size < 0:
            raise EvalkvError(f"h2o: recent_size must be >= 0, got {self.recent_size}")
        if self.recent_size is not None and self.budget is not None and self.recent_size > self.budget:
            raise EvalkvError(f"h2o: recent_size {self.recent_size} exceeds the budget {self.budget}")

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        received = attention_column_sums(view.query, view.query_positions, view.keys, view.positions, view.scaling,
                                         row_lse=view.row_lse)
        if self.granularity == "kv_head" and view.cache.num_heads != received.shape[1]:
            received = reduce_query_heads(received, view.cache.num_heads, self.gqa_reduce)
        previous = view.cache.extras.get(SCORE)
        if previous is not None:
            received[..., : previous.shape[-1]] += previous
        view.cache.extras[SCORE] = received
        length, capacity = view.length, self.capacity(view.sample.prompt_length)
        if length <= capacity:
            return None
        recent = min(capacity // 2 if self.recent_size is None else self.recent_size, capacity)
        return keep_best_and_tail(received[..., : length - recent], capacity - recent, length)

    after_step = compress_prompt  # the same accumulation and cut after every decode step

    def evict_slot(self, view: SlotView) -> Tensor:
        """A fixed-capacity cache's step: add this step's attention to each entry's score, then free the lowest
        scored entry outside the recent window."""
        received = view.probs
        scores = view.state[SCORE]
        if scores.shape[1] != received.shape[1]:
            received = reduce_query_heads(received, scores.shape[1], self.gqa_reduce)
        scores += received
        capacity = view.capacity
        recent = min(capacity // 2 if self.recent_size is None else self.recent_size, capacity)
        positions = view.positions[:, : scores.shape[1]]
        candidates = (positions >= 0) & (positions <= view.newest[:, :, None] - recent)
        return slot_to_evict(scores, positions, candidates)
