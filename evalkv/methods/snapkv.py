"""SnapKV: an observation window of the last prompt queries votes for the prefix tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_column_sums, pool_scores, reduce_query_heads
from evalkv.methods.base import AttentionView, require_choice
from evalkv.methods.registry import register
from evalkv.methods.scorer import Scorer


@register("snapkv")
@dataclass
class SnapKV(Scorer):
    """SnapKV (observation window + pooling + per-head top-k, prompt only).

    Based on "SnapKV: LLM Knows What You are Looking for Before Generation", Li et al., NeurIPS 2024
    (arXiv 2404.14469), reference code FasterDecoding/SnapKV@e216ddc (`SnapKVCluster.update_kv`);
    docs/methods.md#snapkv.

    After the prompt's attention in each layer, if the prompt has more than `budget` tokens: the last `window_size`
    queries attend over all prompt keys (causal inside the window, softmax in fp32 over all keys); a prefix token's
    score is the mean of its attention over the window rows, pooled along positions; each head keeps its
    `budget - window_size` best prefix tokens plus the window. Generated tokens are appended, never evicted (unless
    `decode_interval` re-applies the scorer while decoding, docs/methods.md#regimes).

    Deviations: by default one selection per KV head (scores reduced over the GQA group with `gqa_reduce`, before
    pooling), which frees memory on GQA models; `granularity=query_head` selects per query head as the reference
    does (the cache then holds one copy per query head). Scores stay in fp32 (the reference casts the window's
    probabilities back to the model's dtype before summing them). Ties rank by position; kept entries are stored in
    position order (the reference keeps top-k order; attention is order-invariant). The reference sums the window's
    attention where evalkv averages it, as kvpress's `SnapKVPress` does: the same ranking, and the scale CriticalKV's
    `critical_epsilon` is added on (docs/methods.md#criticalkv).

    window_size: observation window W (paper's LongBench runs: 32; KVCache-Factory: 8).
    kernel_size: pooling kernel (paper: 7; reference code default 5).
    pooling: `max` (paper) or `avg` (zero padding counted, as the reference).
    granularity: `kv_head` (default) or `query_head` (reference).
    gqa_reduce: `mean` or `max` over the query heads of a KV head.
    gqa_order: `reduce_then_pool` (AdaKV, KVCache-Factory) or `pool_then_reduce` (kvpress).
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    granularity: str = "kv_head"
    gqa_reduce: str = "mean"
    gqa_order: str = "reduce_then_pool"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window_settings(self)
        if self.window_size < 1:
            raise EvalkvError(f"{self.name}: window_size must be >= 1, got {self.window_size}")
        if self.budget is not None and self.budget < self.window_size:
            raise EvalkvError(f"{self.name}: budget {self.budget} is smaller than window_size {self.window_size}")

    def window(self) -> int:
        return self.window_size

    def decodes_padded(self) -> bool:
        # Query-head selection turns a row's KV heads into query heads at its first cut: rows cut and not yet cut
        # would hold different head counts.
        return super().decodes_padded() and self.granularity == "kv_head"

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        """Pooled mean window attention of every prefix token, per selection head: `[B, h, candidates]`."""
        window = view.length - candidates
        sums = attention_column_sums(
            view.query[:, :, -window:], view.query_positions[:, -window:], view.keys, view.positions, view.scaling
        )[..., :candidates]
        return pooled_window_scores(sums / window, view.geometry.num_kv_heads, self)


def check_window_settings(settings) -> None:
    """Refuse SnapKV pooling settings (see `pooled_window_scores`) that do not exist, naming the valid ones."""
    require_choice(settings.name, "pooling", settings.pooling, ("max", "avg"))
    require_choice(settings.name, "granularity", settings.granularity, ("kv_head", "query_head"))
    require_choice(settings.name, "gqa_reduce", settings.gqa_reduce, ("mean", "max"))
    require_choice(settings.name, "gqa_order", settings.gqa_order, ("reduce_then_pool", "pool_then_reduce"))
    if settings.kernel_size < 1 or settings.kernel_size % 2 == 0:
        raise EvalkvError(f"{settings.name}: kernel_size must be odd, got {settings.kernel_size}")


def pooled_window_scores(scores: Tensor, num_kv_heads: int, settings) -> Tensor:
    """Window attention over the observation rows (averaged or summed), per query head `[B, H, c]` -> SnapKV's
    pooled scores per selection head. settings: anything with SnapKV's `kernel_size`, `pooling`, `granularity`,
    `gqa_reduce` and `gqa_order` (a SnapKV, LAQ)."""
    if settings.granularity == "query_head":
        return pool_scores(scores, settings.kernel_size, settings.pooling)
    if settings.gqa_order == "reduce_then_pool":
        return pool_scores(reduce_query_heads(scores, num_kv_heads, settings.gqa_reduce), settings.kernel_size,
                           settings.pooling)
    return reduce_query_heads(pool_scores(scores, settings.kernel_size, settings.pooling), num_kv_heads,
                              settings.gqa_reduce)
