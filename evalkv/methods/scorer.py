"""Scorers: a method that is its options plus one function scoring the cache entries; everything else is shared.

A scorer implements `score(view, candidates)`: a score for each of the first `candidates` cache entries, per
selection head, `[batch, heads, candidates]` fp32 (heads = 1 for one set per layer, the KV-head count, or the
query-head count), higher = keep. The entries after the candidates are the observation window (`window()`,
always kept). The shared part (docs/methods.md#regimes) decides when a scorer runs and how many entries it keeps:

- after the prompt's attention (each chunk with `prefill_chunk`): keep `capacity` entries per head, window
  included, where `layer_budgets` shares the budget out per layer (uniform, PyramidKV's `pyramid`, AdaKV's
  `ada_pyramid`) and `head_budgets` per head (uniform, or AdaKV's `adaptive`: a ragged cache, batch size 1);
- with `decode_interval`, while decoding too, with kvpress `DecodingPress`'s semantics: every `decode_interval`
  forwards after the prompt (the question fed after a query-agnostic compression counts as one), the cache is
  scored again with the queries of the forwards since the last compression (at most `decode_buffer` of them, the
  newest; they play the prompt's observation rows) and cut back to `decode_target` entries per head (default: the
  budget); between cuts it grows by one entry per step.

How the kept entries are chosen from the scores: the best per head (default), whole chunks of `chunk_length`
consecutive entries shared by the layer (ChunkKV, `budgets.chunk_selection`), or CriticalKV's two stages with
`critical` (the scores rescaled by each value's output-projection norm, evalkv/methods/criticalkv.py).

Selection is `evalkv.kv.select`'s stable top-k (ties by position); kept entries stay in position order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.select import keep_best_and_tail, top_k_positions
from evalkv.methods.base import AttentionView, Keep, Method, require_choice
from evalkv.methods.budgets import (
    HEAD_ALLOCATIONS,
    LAYER_SCHEDULES,
    adaptive_head_budgets,
    chunk_selection,
    layer_capacity,
)
from evalkv.methods.criticalkv import critical_scores

_ROWS, _ROW_POSITIONS = "decode_rows", "decode_row_positions"


@dataclass
class Scorer(Method):
    """Base of the methods that score entries (see the module docstring).

    layer_budgets: `uniform`, `pyramid` (PyramidKV's per-layer schedule) or `ada_pyramid` (AdaKV's).
    beta: the pyramid's steepness (smallest layer budget = average // beta; PyramidKV: 20).
    head_budgets: `uniform`, or `adaptive` (AdaKV: the layer's budget shared among its heads by their scores).
    floor_alpha: with `adaptive`, the share of the budget every head keeps (AdaKV: 0.2).
    normalize: with `adaptive`, scale each head's scores by the share of its mass in its own top before ranking.
    skip_layers: with `adaptive`, the first layers keep the uniform budget.
    decode_interval: re-score and cut the cache every this many forwards after the prompt (None: prompt only).
    decode_target: entries per head after each cut while decoding (None: the budget).
    decode_buffer: queries kept for the next cut (kvpress's hidden_states_buffer_size); 0 or 1: the newest only.
    chunk_length: keep whole chunks of this many consecutive entries, one set for the layer (ChunkKV; None: entries).
    critical: CriticalKV's two-stage selection (scores rescaled by each value's output-projection norm).
    critical_first_stage: with `critical`, the share of each head's budget chosen by the raw scores (kvpress: 0.5).
    critical_epsilon: with `critical`, added to the scores before rescaling (kvpress: 1e-4).
    """

    # The only state is the decode queries buffered since the last cut, `[B, h, n, d]` and `[B, n]`: equal in shape
    # for samples that decode in lockstep from their prompts, so they decode as one batch.
    batched_state: ClassVar[bool] = True

    layer_budgets: str = "uniform"
    beta: int = 20
    head_budgets: str = "uniform"
    floor_alpha: float = 0.2
    normalize: bool = False
    skip_layers: int = 0
    decode_interval: Optional[int] = None
    decode_target: Optional[int] = None
    decode_buffer: int = 256
    chunk_length: Optional[int] = None
    critical: bool = False
    critical_first_stage: float = 0.5
    critical_epsilon: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self.name, "layer_budgets", self.layer_budgets, LAYER_SCHEDULES)
        require_choice(self.name, "head_budgets", self.head_budgets, HEAD_ALLOCATIONS)
        if self.beta < 1 or self.skip_layers < 0 or not 0.0 <= self.floor_alpha <= 1.0:
            raise EvalkvError(f"{self.name}: need beta >= 1, skip_layers >= 0 and floor_alpha in [0, 1], got "
                              f"{self.beta}, {self.skip_layers}, {self.floor_alpha}")
        if self.decode_interval is None:
            if self.decode_target is not None:
                raise EvalkvError(f"{self.name}: decode_target applies while decoding: set decode_interval too")
            self.after_step = None
        elif self.decode_interval < 1 or self.decode_buffer < 0 or (
                self.decode_target is not None and self.decode_target < 1):
            raise EvalkvError(f"{self.name}: need decode_interval >= 1, decode_target >= 1 and decode_buffer >= 0, "
                              f"got {self.decode_interval}, {self.decode_target}, {self.decode_buffer}")
        elif self.head_budgets == "adaptive":
            raise EvalkvError(f"{self.name}: head_budgets=adaptive keeps a ragged cache, which decode_interval cannot "
                              "cut again; use one of them")
        per_head = self.head_budgets == "adaptive" or self.critical
        if self.chunk_length is not None and (self.chunk_length < 1 or per_head):
            raise EvalkvError(f"{self.name}: chunk_length must be a positive number of entries and selects one set for "
                              "the layer, so it takes neither head_budgets=adaptive nor critical; got "
                              f"chunk_length={self.chunk_length}")
        if not 0.0 <= self.critical_first_stage <= 1.0 or self.critical_epsilon < 0:
            raise EvalkvError(f"{self.name}: need critical_first_stage in [0, 1] and critical_epsilon >= 0, got "
                              f"{self.critical_first_stage}, {self.critical_epsilon}")

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        """Scores `[B, h, candidates]` of the first `candidates` entries of `view.cache` (higher = keep), from the
        observation rows `view.query` at `view.query_positions`."""
        raise NotImplementedError

    def window(self) -> int:
        """Newest entries always kept and not scored (the observation window)."""
        return 0

    def compress_prompt(self, view: AttentionView) -> Keep:
        if self._buffers_rows(view):  # an empty buffer from the prompt on: this sample keeps per-sample state
            view.state[_ROWS], view.state[_ROW_POSITIONS] = view.query[:, :, :0], view.query_positions[:, :0]
        capacity = layer_capacity(self.layer_budgets, self.capacity(view.sample.prompt_length), self.window(),
                                  view.length, view.geometry.num_layers, view.layer_idx, self.beta)
        if capacity is None or view.length <= capacity:
            return None
        return self.select(view, capacity)

    def after_step(self, view: AttentionView) -> Keep:
        rows, positions = self._observation_rows(view)
        if view.sample.steps_after_prompt % self.decode_interval:
            return None
        if self._buffers_rows(view):
            view.state[_ROWS], view.state[_ROW_POSITIONS] = rows[:, :, :0], positions[:, :0]
        target = self.decode_target or self.capacity(view.sample.prompt_length)
        if view.cache.padded:
            return self._cut_rows(view, rows, positions, target)
        if view.length <= target:
            return None
        return self.select(dataclasses.replace(view, query=rows, query_positions=positions), target)

    def segment_steps(self, sample) -> Optional[int]:
        """The forwards up to and including the next cut: between cuts `after_step` only buffers each forward's
        queries (the newest `decode_buffer`), which one call over all of them does as well, then cuts."""
        if self.after_step is None or self.decode_interval < 2:
            return None
        return self.decode_interval - sample.steps_after_prompt % self.decode_interval

    def segment_queries(self) -> Optional[int]:
        return max(1, self.decode_buffer)  # `_observation_rows` keeps the newest `decode_buffer`

    def decodes_padded(self) -> bool:
        """Cuts every few steps read a padded batch row by row (`_cut_rows`); a cut at every step (TOVA) would do so
        at every step, and per-head budgets keep no common count: those rows decode alone (TOVA's batch in the slot
        cache)."""
        return self.after_step is not None and self.decode_interval > 1 and self.head_budgets == "uniform"

    def _cut_rows(self, view: AttentionView, rows: Tensor, positions: Tensor, target: int) -> Keep:
        """A cut of a batch padded to a common length (prompts shorter than the budget, `decodes_padded`): each row
        is scored over its own entries with its own buffered queries, as it would be alone, and keeps its `target`
        best, or all of them when it holds no more; a row keeping fewer fills the common count with its padding,
        which stays at position -1. None when no row holds more than `target`."""
        layer = view.cache
        order, counts = layer.entries_first()
        if max(counts) <= target:
            return None
        kept = []
        for row, count in enumerate(counts):
            index = order[row, :, :count]
            if count > target:
                alone = dataclasses.replace(
                    view, cache=layer.row_entries(row, index), query=rows[row : row + 1],
                    query_positions=positions[row : row + 1], state={},
                    output=None if view.output is None else view.output[row : row + 1])
                chosen = self.select(alone, target)[0]  # [h, target], h = 1 for one set shared by the heads
                index = index.gather(1, chosen.expand(index.shape[0], -1))
            kept.append(index)
        width = max(index.shape[-1] for index in kept)  # the padding after each row's entries fills the rest
        return torch.stack([torch.cat([index, order[row, :, count : count + width - index.shape[-1]]], dim=-1)
                            for row, (index, count) in enumerate(zip(kept, counts))])

    def select(self, view: AttentionView, capacity: int) -> Keep:
        """Keep `capacity` entries per head (on average, with adaptive head budgets): the window, then the best."""
        window = min(self.window(), view.num_new, capacity)
        candidates, keep = view.length - window, capacity - window
        scores = self.score(view, candidates)
        tail = torch.arange(candidates, view.length, device=scores.device)
        if self.chunk_length is not None:
            best = chunk_selection(scores, self.chunk_length, keep)
            return torch.cat([best, tail.expand(*best.shape[:-1], tail.numel())], dim=-1)
        if self.head_budgets == "uniform":
            if self.critical:
                scores = self._critical(view, scores, [keep] * scores.shape[1], window)
            return keep_best_and_tail(scores, keep, view.length)
        if scores.shape[0] != 1:
            raise EvalkvError(f"{self.name}: head_budgets=adaptive keeps a different number of tokens per head and "
                              "needs batch size 1")
        if view.layer_idx < self.skip_layers:
            budgets = [keep] * scores.shape[1]
        else:
            budgets = adaptive_head_budgets(scores[0], keep, self.floor_alpha, self.normalize)
        if self.critical:
            scores = self._critical(view, scores, budgets, window)
        return [torch.cat([top_k_positions(head, budget), tail]) for head, budget in zip(scores[0], budgets)]

    def _critical(self, view: AttentionView, scores: Tensor, budgets: list[int], window: int) -> Tensor:
        return critical_scores(view, scores, budgets, window, self.critical_first_stage, self.critical_epsilon)

    def _buffers_rows(self, view: AttentionView) -> bool:
        """Whether cuts need queries of earlier forwards (kept in `view.state`); `decode_interval=1` needs none, so
        such a scorer keeps no per-sample state and its samples decode in batches."""
        return self.decode_interval is not None and self.decode_interval > 1 and self.decode_buffer > 1

    def _observation_rows(self, view: AttentionView) -> tuple[Tensor, Tensor]:
        """The queries since the last cut (at most `decode_buffer`, the newest), this forward's included."""
        limit = max(1, self.decode_buffer)
        rows, positions = view.query, view.query_positions
        if self._buffers_rows(view):
            rows = torch.cat([view.state[_ROWS], rows], dim=-2)
            positions = torch.cat([view.state[_ROW_POSITIONS], positions], dim=-1)
        rows, positions = rows[:, :, -limit:], positions[:, -limit:]
        if self._buffers_rows(view):
            view.state[_ROWS], view.state[_ROW_POSITIONS] = rows, positions
        return rows, positions
