"""LAQ (Lookahead Q-Cache): the queries of the first generated tokens vote, with the last prompt queries, for the
prompt tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_column_sums
from evalkv.kv.select import keep_best_and_tail
from evalkv.methods.base import AttentionView, Method, Phase
from evalkv.methods.registry import register
from evalkv.methods.snapkv import SnapKV, check_window_settings, pooled_window_scores


@register("laq")
@dataclass
class LAQ(Method):
    """Lookahead Q-Cache (SnapKV-style selection voted by the queries of the first generated tokens).

    Based on "Lookahead Q-Cache: Achieving More Consistent KV Cache Eviction via Pseudo Query", Wang et al., EMNLP
    2025 (arXiv 2505.20334), reference code noforit/Lookahead_Q-Cache@74612bd (`LlamaForCausalLM_forward_LAQ`,
    `select_KV_lookahead_stage`, `select_KV_decoding_stage` in `pyramidkv/llama_model.py`;
    `SnapKVCluster.update_kv_LAQ` in `pyramidkv/pyramidkv_utils.py`; `run_LAQ.sh`); docs/methods.md#laq.

    The reference prefills the whole prompt and keeps that cache; it generates `lookahead_steps` pseudo tokens with
    a SnapKV copy of it (window 32, the budget) and records their queries; it then scores the full prompt cache with
    the last `window_size` prompt queries and those pseudo queries (SnapKV's scores: window attention summed over
    the rows, max-pooled), keeps the `budget - window_size` best prefix tokens and the last `window_size` prompt
    tokens, discards the pseudo tokens and generates the answer from the first token on with that cache.

    evalkv's engine runs no forward outside the answer, so here the lookahead tokens are the answer's first
    `lookahead_steps` tokens: after the prompt's attention the layer keeps `lookahead_budget` entries (SnapKV with
    `lookahead_window`; null: the whole prompt, the cache LAQ selects from), the first `lookahead_steps` decode
    steps attend to that cache, and after the attention of decode step `lookahead_steps` the prompt entries are cut
    to `budget` by the reference's stage-2 scores (the last `window_size` prompt queries and the `lookahead_steps`
    decode queries over the entries before decoding, softmax over those entries, masked by true position); the
    generated tokens (and a query-agnostic run's question) stay. Later steps append.

    Deviations: the lookahead tokens are kept as the answer's first tokens, generated from the `lookahead_budget`
    cache (with the default, the whole prompt: an answer of at most `lookahead_steps` tokens is the full cache's);
    the reference generates them from a SnapKV cache of the budget and throws them away, which needs an engine
    that forks a sample's cache for a rehearsal (docs/methods.md#laq). With `lookahead_budget` set, stage 2 selects
    among its survivors, not the whole prompt. The reference's stage-2 mask is misaligned (it masks the last
    `window_size + lookahead_steps` prompt keys as if the rows were the last prompt positions); evalkv masks by true
    position. A query-agnostic question's last `window_size` queries replace the prompt's as observation rows, and
    the whole prompt competes. GQA granularity as SnapKV (KV head by default; the reference selects per query head
    after `repeat_kv`: `granularity=query_head`). fp32 scores; ties by position.

    window_size: prompt queries observing in stage 2 and prompt tokens always kept (run_LAQ.sh `stage2_window_size`:
        8).
    lookahead_steps: generated tokens whose queries observe (`max_lookahead_size`: 8).
    lookahead_budget: entries kept while generating them (null: the whole prompt; the reference: the budget; raised
        to the budget when smaller).
    lookahead_window: SnapKV's window for that cut (`lookahead_window_size`: 32).
    kernel_size, pooling: stage-2 (and stage-1) pooling (the reference: 7, max).
    granularity, gqa_reduce, gqa_order: as SnapKV's.
    """

    window_size: int = 8
    lookahead_steps: int = 8
    lookahead_budget: Optional[int] = None
    lookahead_window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    granularity: str = "kv_head"
    gqa_reduce: str = "mean"
    gqa_order: str = "reduce_then_pool"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window_settings(self)
        if self.window_size < 0 or self.lookahead_steps < 1 or self.lookahead_window < self.window_size:
            raise EvalkvError(f"{self.name}: need window_size >= 0, lookahead_steps >= 1 and lookahead_window >= "
                              f"window_size, got {self.window_size}, {self.lookahead_steps}, {self.lookahead_window}")
        if self.budget is not None and self.budget <= self.window_size:
            raise EvalkvError(f"{self.name}: budget {self.budget} must exceed window_size {self.window_size}")
        self._lookahead = None
        if self.lookahead_budget is not None:
            if self.lookahead_budget <= self.lookahead_window:
                raise EvalkvError(f"{self.name}: lookahead_budget {self.lookahead_budget} must exceed lookahead_window "
                                  f"{self.lookahead_window}")
            self._lookahead = SnapKV(budget=self.lookahead_budget, window_size=self.lookahead_window,
                                     kernel_size=self.kernel_size, pooling=self.pooling, granularity=self.granularity,
                                     gqa_reduce=self.gqa_reduce, gqa_order=self.gqa_order)

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        self._observe(view)
        if self._lookahead is None:
            return None
        capacity = max(self.lookahead_budget, self.capacity(view.sample.prompt_length))
        return None if view.length <= capacity else self._lookahead.select(view, capacity)

    def after_step(self, view: AttentionView) -> Tensor | None:
        state = view.state
        if state.get("done"):
            return None
        if view.phase is Phase.SUFFIX:
            self._observe(view)
            return None
        state.setdefault("lookahead", []).append(view.query)
        state.setdefault("lookahead_positions", []).append(view.query_positions)
        if view.sample.decode_step < self.lookahead_steps:
            return None
        rows = torch.cat([state.pop("rows"), *state.pop("lookahead")], dim=-2)
        row_positions = torch.cat([state.pop("row_positions"), *state.pop("lookahead_positions")], dim=-1)
        state.clear()
        state["done"] = True
        return self._select(view, rows, row_positions)

    def _observe(self, view: AttentionView) -> None:
        """Keep the last `window_size` queries of this forward, the stage-2 observation rows."""
        start = view.num_new - min(self.window_size, view.num_new)
        view.state["rows"] = view.query[:, :, start:].clone()
        view.state["row_positions"] = view.query_positions[:, start:].clone()

    def _select(self, view: AttentionView, rows: Tensor, row_positions: Tensor) -> Tensor | None:
        """Stage 2: the prompt entries cut to the budget, scored by the observation and lookahead rows."""
        n = view.sample.prompt_length
        positions = view.positions[0, 0]  # every head holds the same number of entries of each kind
        first_generated = int(row_positions[0, -self.lookahead_steps])
        window_start = n if self.window_size == 0 else min(n, int(row_positions[0, 0]))
        prompt_entries = int((positions < n).sum())
        capacity = self.capacity(n)
        if prompt_entries <= capacity:
            return None
        candidates = int((positions < window_start).sum())
        before_decoding = int((positions < first_generated).sum())
        sums = attention_column_sums(rows, row_positions, view.keys[..., :before_decoding, :],
                                     view.positions[..., :before_decoding], view.scaling)[..., :candidates]
        scores = pooled_window_scores(sums, view.geometry.num_kv_heads, self)
        return keep_best_and_tail(scores, capacity - (prompt_entries - candidates), view.length)
