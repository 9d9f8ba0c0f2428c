"""Choosing which cache entries to keep: the one place with the tie rule (docs/methods.md#shared-tie-rule).

All functions return indices into the cache's entries, ascending; entries are stored in position order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best scores along the last dim, returned in ascending index order.

    Ties rank by (score desc, index asc) through a stable sort (evalkv's choice, docs/methods.md#shared-tie-rule); cache
    entries are kept in position order, so the index order is the position order.
    """
    k = max(0, min(k, scores.shape[-1]))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def top_k_by_group(scores: Tensor, groups: Tensor, group_scores: Tensor, k: int) -> Tensor:
    """k entries taken group by group: whole groups in (group score desc, group index asc) order, the group that
    would overflow `k` filled with its best entries (score desc, index asc). Ascending indices.

    scores, groups `[..., m]` (groups: int64 in `[0, G)`), group_scores `[..., G]`.
    """
    k = max(0, min(k, scores.shape[-1]))
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    group_order = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices
    group_rank = torch.empty_like(group_order).scatter_(-1, group_order, torch.arange(
        group_order.shape[-1], device=group_order.device).expand_as(group_order).contiguous())
    entry_rank = group_rank.gather(-1, groups.gather(-1, by_score))
    order = by_score.gather(-1, torch.sort(entry_rank, dim=-1, stable=True).indices)
    return order[..., :k].sort(dim=-1).values


def keep_best_and_tail(candidate_scores: Tensor, k: int, length: int) -> Tensor:
    """The best `k` candidates plus every entry after them.

    candidate_scores `[B, h, c]` score the first c entries; entries `c .. length-1` (an observation window, a recent
    window) are always kept. Returns indices `[B, h, min(k, c) + length - c]`.
    """
    best = top_k_positions(candidate_scores, k)
    tail = torch.arange(candidate_scores.shape[-1], length, device=candidate_scores.device)
    return torch.cat([best, tail.expand(*best.shape[:-1], tail.numel())], dim=-1)


def keep_sink_and_recent(length: int, sink: int, recent: int, device: torch.device) -> Tensor:
    """The first `sink` and the last `recent` entries, `[1, 1, k]` (shared by all heads)."""
    sink = min(sink, length)
    recent = min(recent, length - sink)
    head = torch.arange(sink, device=device)
    tail = torch.arange(length - recent, length, device=device)
    return torch.cat([head, tail])[None, None, :]


def slot_to_evict(scores: Tensor, positions: Tensor, candidates: Tensor) -> Tensor:
    """The slot a full cache frees (`evalkv.kv.slots`): among `candidates`, the lowest score, ties to the latest
    position, i.e. the entry `top_k_positions` would rank last (score desc, position asc). `[..., S]` -> `[..., 1]`.

    scores: fp32; positions: the true positions (slot order is arbitrary); candidates: bool."""
    lowest = torch.where(candidates, scores, float("inf")).amin(dim=-1, keepdim=True)
    tied = candidates & (scores == lowest)
    return torch.where(tied, positions, -1).argmax(dim=-1, keepdim=True)
