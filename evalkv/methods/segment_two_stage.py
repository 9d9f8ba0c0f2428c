"""SegKV-CF: segment-level eviction, a coarse cut after the prompt and a fine cut after a few generated tokens."""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import reduce_query_heads, window_attention
from evalkv.kv.select import keep_best_and_tail
from evalkv.methods.base import AttentionView, Method, Phase, require_choice
from evalkv.methods.registry import register

# A decoded token made only of ! . ? \r \n " % ' ) ], with at least one of ! . ? \r \n (sentence ends).
QA_SEPARATOR = re.compile(r"""^(?=.*[!.?\r\n])(?!^["%')\]]+$)[!.?\r\n"%')\]]+$""")
# Optional spaces / closing brackets / quotes, then one of ; : \n, then only spaces ; : \n (statement ends).
CODE_SEPARATOR = re.compile(r"""^[ )\]{}"' ]*[;:\n][ ;:\n]*$""")
SEED_MAX_CAPACITY = 128
WINDOW_QUERIES = 32  # v1 stores the last 32 prompt queries for stage 2, whatever window_size is

_separators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def separator_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(QA ids, code ids): every vocabulary id whose decoded text matches the QA / code pattern; once per tokenizer
    (a vocabulary-sized decode loop, about a second for 150K tokens)."""
    if tokenizer not in _separators:
        qa, code = [], []
        for token_id in sorted(tokenizer.get_vocab().values()):
            text = tokenizer.decode([token_id])
            if QA_SEPARATOR.match(text):
                qa.append(token_id)
            if CODE_SEPARATOR.match(text):
                code.append(token_id)
        _separators[tokenizer] = (qa, code)
    return _separators[tokenizer]


def segment_bounds(input_ids: Tensor, qa_ids: list[int], code_ids: list[int], prefix_length: int) -> Tensor:
    """Segment starts of the prefix `[0, prefix_length)`, then `prefix_length`: `[0, b_1, ..., prefix_length]`.

    The separator set whose positions in the prompt have the larger sum is used (a count weighted by position, as
    the reference); a separator at position p ends its segment (bound p + 1).
    """
    found = [torch.nonzero(torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)))
             .flatten() for ids in (qa_ids, code_ids)]
    positions = found[0] if found[0].sum() > found[1].sum() else found[1]
    bounds = positions[positions < prefix_length] + 1
    edges = torch.tensor([0, prefix_length], dtype=bounds.dtype, device=bounds.device)
    return torch.unique(torch.cat([edges, bounds]))


def segment_mean_scores(token_scores: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """Each token's score replaced by the mean score of the tokens of its segment present here: `[B, h, c]`.

    num_segments: any count above the largest segment index (the bounds' length: known without waiting for the
    device, as `segments.max()` would)."""
    shape = (*token_scores.shape[:-1], num_segments)
    sums = token_scores.new_zeros(shape).scatter_add(-1, segments, token_scores)
    counts = token_scores.new_zeros(shape).scatter_add(-1, segments, torch.ones_like(token_scores))
    return (sums / (counts + 1e-6)).gather(-1, segments)


@register("segment_two_stage")
@dataclass
class SegmentTwoStage(Method):
    """SegKV-CF (segment-level eviction with coarse-to-fine refinement), v1 `segment_two_stage`.

    Based on "SegKV-CF: Segment-Level KV Cache Eviction with Coarse-to-Fine Refinement" (anonymous, under review,
    no arXiv id), reference code Nagisasiki/SegKV-CF@1f06f75 (v1: `TwoStageSegmentKV` in
    `kv_compress/segkv/segmentkv_two_stages_utils.py`; the separator regexes from v2 @4123860, `segkv_cf_utils.py`).

    Segments: the tokenizer's separator ids (decoded tokens matching `QA_SEPARATOR` / `CODE_SEPARATOR`); per prompt,
    the set whose positions have the larger sum; a separator ends its segment; only the prefix `[0, n - W)` is
    segmented (W = `window_size`). A token's score is the mean, over the segment's tokens present in the cache, of
    the attention it gets from a set of query rows (averaged over the rows, softmax over the whole cache).
    Stage 1, after the prompt's attention: if n exceeds the coarse budget C1, each head keeps the window and its
    `C1 - W` best prefix tokens, scored by the last W prompt queries (whole segments, at most one partial segment).
    Stage 2, before the attention of decode step `lookahead_steps` (Lk), unless the cache is then shorter than the
    budget C: keep the window, the Lk generated tokens (and a query-agnostic run's question) and the `C - W - Lk`
    (less the question) best stage-1 survivors, scored by the last 32 prompt queries and the queries of the Lk
    generated tokens (`stage2_queries=window+lookahead`, v1) or by the generated tokens' queries alone (`lookahead`,
    v2). The cache is then exactly C per head; it grows by one per
    later step (no more eviction).

    Budget: `budget` is the final capacity C, the seed's `max_capacity` (default 128 when no budget is given;
    `max_capacity=` is accepted as the seed's name for it); window and generated tokens included.

    Deviations: the coarse budget is raised to C when C is larger (the reference would cut to C1 and never reach C); an
    empty separator set gives one prefix segment (the reference fails); scores in fp32 (the reference averages
    probabilities cast to fp16); ties rank by position, so the partial segment keeps its first tokens
    (docs/methods.md#shared-tie-rule); kept entries are stored in position order (the reference keeps top-k order).
    Stage 2 always uses the last 32 prompt queries as v1 hard-codes, masked by true positions, which stays exact when W
    != 32 (v1's mask assumes W = 32). Prompt-suffix tokens (query-agnostic runs) are kept like the window. Separator ids
    are cached in memory per tokenizer object (the reference writes them to files).

    window_size: observation window W (seed: 32).   coarse_budget: stage-1 capacity C1 (v1: 2048).
    lookahead_steps: Lk (seed CLI: 2).   stage2_queries: `window+lookahead` (v1) or `lookahead` (v2).
    granularity: `query_head` (reference: one selection per query head, the cache holds one copy per query head)
        or `kv_head` (token scores averaged over the GQA group, one selection per KV head).
    """

    max_capacity: Optional[int] = None
    window_size: int = 32
    coarse_budget: int = 2048
    lookahead_steps: int = 2
    stage2_queries: str = "window+lookahead"
    granularity: str = "query_head"
    _separator_ids: ClassVar[tuple[list[int], list[int]] | None] = None  # set by prepare()

    def __post_init__(self) -> None:
        if self.max_capacity is not None:
            if self.budget not in (None, self.max_capacity):
                raise EvalkvError(f"{self.name}: budget {self.budget} and max_capacity {self.max_capacity} differ; "
                                  "max_capacity is the seed's name for the budget, give one")
            self.budget = self.max_capacity
        elif self.budget is None and self.compression_ratio is None:
            self.budget = SEED_MAX_CAPACITY
        super().__post_init__()
        require_choice(self.name, "stage2_queries", self.stage2_queries, ("window+lookahead", "lookahead"))
        require_choice(self.name, "granularity", self.granularity, ("query_head", "kv_head"))
        if self.window_size < 1 or self.lookahead_steps < 1 or self.coarse_budget <= self.window_size:
            raise EvalkvError(f"{self.name}: need window_size >= 1, lookahead_steps >= 1 and coarse_budget > "
                              f"window_size, got {self.window_size}, {self.lookahead_steps}, {self.coarse_budget}")
        if self.budget is not None and self.budget <= self.window_size + self.lookahead_steps:
            raise EvalkvError(f"{self.name}: budget {self.budget} must exceed window_size + lookahead_steps "
                              f"({self.window_size + self.lookahead_steps})")

    def prepare(self, tokenizer) -> None:
        self._separator_ids = None if tokenizer is None else separator_ids(tokenizer)

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        self._segment_bounds(view)  # fails early without a tokenizer
        if self.stage2_queries == "window+lookahead":
            view.state["rows"] = [view.query[:, :, -WINDOW_QUERIES:].clone()]
            view.state["row_positions"] = [view.query_positions[:, -WINDOW_QUERIES:].clone()]
        n = view.sample.prompt_length
        coarse = max(self.coarse_budget, self.capacity(n))
        if view.length <= coarse:
            return None
        window = min(self.window_size, n)
        probs = window_attention(view.query[:, :, -window:], view.query_positions[:, -window:], view.keys,
                                 view.positions, view.scaling)
        return self._select(view, probs, candidates=view.length - window, keep=coarse - window)

    def before_step(self, view: AttentionView) -> Tensor | None:
        """Stage 2: the fine cut before the attention of decode step `lookahead_steps` (C counts the generated
        tokens)."""
        state = view.state
        if view.phase is not Phase.DECODE or state.get("done"):
            return None
        capacity = self.capacity(view.sample.prompt_length)
        if view.length < capacity:  # the cache never reaches C: no stage 2
            state.clear()
            state["done"] = True
            return None
        state.setdefault("rows", []).append(view.query)
        state.setdefault("row_positions", []).append(view.query_positions)
        if view.sample.decode_step < self.lookahead_steps:
            return None
        rows, row_positions = torch.cat(state.pop("rows"), dim=-2), torch.cat(state.pop("row_positions"), dim=-1)
        state["done"] = True
        probs = window_attention(rows, row_positions, view.keys, view.positions, view.scaling)
        prefix = int(self._segment_bounds(view)[-1])
        candidates = int((view.positions[0, 0] < prefix).sum())  # the stage-1 survivors lead the cache
        return self._select(view, probs, candidates, keep=max(0, capacity - (view.length - candidates)))

    def _segment_bounds(self, view: AttentionView) -> Tensor:
        """The prompt's segment bounds, computed once per sample (shared by the layers)."""
        bounds = view.sample.state.get("segment_bounds")
        if bounds is None:
            if self._separator_ids is None:
                raise EvalkvError(f"{self.name} needs the model's tokenizer for its separators: build the Engine "
                                  "with tokenizer=...")
            n = view.sample.prompt_length
            input_ids = view.sample.input_ids[0].to(view.keys.device)
            bounds = segment_bounds(input_ids, *self._separator_ids, n - min(self.window_size, n))
            view.sample.state["segment_bounds"] = bounds
        return bounds

    def _select(self, view: AttentionView, probs: Tensor, candidates: int, keep: int) -> Tensor | None:
        """Keep the `keep` candidates (the first `candidates` entries) of the best segments, plus every later entry."""
        if candidates == 0:
            return None
        token_scores = probs[..., :candidates].mean(dim=-2)  # [B, H, c]
        if self.granularity == "kv_head":
            token_scores = reduce_query_heads(token_scores, view.cache.num_heads)
        positions = view.positions[..., :candidates]
        positions = positions.repeat_interleave(token_scores.shape[1] // positions.shape[1], dim=1)
        bounds = self._segment_bounds(view)
        segments = torch.searchsorted(bounds, positions.contiguous(), right=True) - 1
        return keep_best_and_tail(segment_mean_scores(token_scores, segments, bounds.numel()), keep, view.length)
