"""Key channel pruning (ThinK): the prompt's keys keep only the channels the last prompt queries need, in memory.

ThinK (Xu et al., ICLR 2025, arXiv 2407.21018; docs/methods.md#think) scores each key channel `c` of a head by the
size of its contribution to `Q K^T` over an observation window of the last prompt queries,

    score_c = mean_rows(q_c^2) * mean_entries(k_c^2)    (= ||Q_w[:, c]||^2 ||K[:, c]||^2 / (w n): the paper's
                                                          ||Q_w[:, c] K[:, c]^T||_F, squared and scaled)

and keeps the best channels of the prompt's keys. Here the pruned keys leave memory: a layer holds its first `n`
entries' keys as `PrunedKeys` (`[B, H_c, n, k]`, plus the kept channel indices `[B, H_c, k]`) and every later
entry's keys at full width (`LayerCache.keys`, `[B, H_c, m - n, d]`); values are untouched. `attend_pruned` computes
exactly what attention over zero-filled keys computes (a zero channel adds nothing to `q . k`): the pruned entries'
logits from the query's kept channels, the others' from every channel, one softmax over both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from evalkv.kv.attention import _bottom_right_causal
from evalkv.kv.select import top_k_positions


class KeyChannels(NamedTuple):
    """A channel-pruning decision for one layer: each head's kept channels `[B, H_c, k]` (ascending), applied to every
    entry but the newest `recent`, which keep their full width."""

    kept: Tensor
    recent: int


@dataclass
class PrunedKeys:
    """A layer's first `length` entries' keys, each head holding only its kept channels."""

    keys: Tensor  # [B, H_c, n, k]
    channels: Tensor  # [B, H_c, k] int64, ascending: the channel of the full key each stored channel is
    head_dim: int  # d, the full key width

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def freed_nbytes(self) -> int:
        """Bytes one batch row saves against full-width keys (the channel indices are bookkeeping, as positions)."""
        return self.keys.shape[1] * self.length * (self.head_dim - self.keys.shape[-1]) * self.keys.element_size()

    def dense(self) -> Tensor:
        """The keys at full width, zeros in the pruned channels `[B, H_c, n, d]` (what kvpress's ThinKPress holds)."""
        full = self.keys.new_zeros(*self.keys.shape[:-1], self.head_dim)
        index = self.channels[:, :, None, :].expand_as(self.keys)
        return full.scatter(-1, index, self.keys)

    def clone(self) -> PrunedKeys:
        return PrunedKeys(self.keys.clone(), self.channels.clone(), self.head_dim)

    @staticmethod
    def stack(parts: Sequence[PrunedKeys]) -> PrunedKeys:
        """`parts` (equal shapes) as the rows of one batch, in order."""
        return PrunedKeys(torch.cat([part.keys for part in parts]), torch.cat([part.channels for part in parts]),
                          parts[0].head_dim)

    def select_rows(self, index: Tensor) -> PrunedKeys:
        return PrunedKeys(self.keys.index_select(0, index), self.channels.index_select(0, index), self.head_dim)


def prune_keys(keys: Tensor, kept: Tensor, recent: int) -> tuple[PrunedKeys | None, Tensor]:
    """Split full-width keys `[B, H_c, m, d]` into the pruned older entries (every entry but the newest `recent`,
    channels `kept` `[B, H_c, k]`) and the newest entries at full width. Both are new tensors: the full-width keys of
    the pruned entries leave memory with `keys`. None for the pruned part when no entry is pruned."""
    length = max(0, keys.shape[-2] - recent)
    if length == 0:
        return None, keys
    kept = kept.to(keys.device).expand(keys.shape[0], keys.shape[1], kept.shape[-1])
    older = keys[:, :, :length].gather(-1, kept[:, :, None, :].expand(*keys.shape[:2], length, kept.shape[-1]))
    newest = keys[:, :, length:].clone(memory_format=torch.contiguous_format)
    return PrunedKeys(older, kept.contiguous(), keys.shape[-1]), newest


def attend_pruned(query: Tensor, pruned: PrunedKeys, keys: Tensor, values: Tensor, scaling: float) -> Tensor:
    """Causal attention of the `q` newest tokens over a layer whose first entries' keys are `pruned`; returns
    `[B, H, q, d]`.

    keys `[B, H_c, t, d]` are the later entries' (the `q` new tokens last), values `[B, H_c, n + t, d]` every entry's.
    The pruned entries precede every query, so all of them are visible; the causal mask is aligned bottom-right over
    the later ones. Products in the model's dtype, the softmax in fp32, as `attend`'s decode path; the query heads of
    a KV head are rows of one product, so no key is copied per query head.
    """
    batch, num_heads, q_len, dim = query.shape
    heads = values.shape[1]
    rows = query.reshape(batch, heads, num_heads // heads * q_len, dim)
    channels = pruned.channels[:, :, None, :].expand(batch, heads, rows.shape[2], pruned.channels.shape[-1])
    older = torch.matmul(rows.gather(-1, channels), pruned.keys.transpose(-1, -2))  # [B, H_c, G q, n]
    newer = torch.matmul(rows, keys.transpose(-1, -2))  # [B, H_c, G q, t]
    newer = newer.reshape(batch, heads, -1, q_len, keys.shape[-2])
    newer = newer.masked_fill(~_bottom_right_causal(q_len, keys.shape[-2], query.device), float("-inf"))
    logits = torch.cat([older.reshape(batch, heads, -1, q_len, pruned.length).float(), newer.float()], dim=-1)
    probs = torch.softmax(logits * scaling, dim=-1).to(values.dtype)
    output = torch.matmul(probs.reshape(batch, heads, -1, values.shape[-2]), values)
    return output.reshape(batch, num_heads, q_len, dim)


def key_channel_scores(rows: Tensor, keys: Tensor) -> Tensor:
    """ThinK's channel importance `[B, H_c, d]` fp32 from observation queries `rows` `[B, H, w, d]` and a head's keys
    `[B, H_c, n, d]`: mean over the rows of `q_c^2` (averaged over the query heads of a KV head when `H_c < H`, as
    kvpress's ThinKPress does) times the mean over the entries of `k_c^2`."""
    batch, num_heads, _, dim = rows.shape
    heads = keys.shape[1]
    queries = rows.float().pow(2).mean(dim=2).reshape(batch, heads, num_heads // heads, dim).mean(dim=2)
    return queries * keys.float().pow(2).mean(dim=2)


def choose_key_channels(rows: Tensor, layer_keys: Sequence[Tensor], ratio: float) -> Tensor | None:
    """The channels each head keeps, `[B, H_c, k]` ascending with `k = d - int(d * ratio)` (ThinK and kvpress prune
    `int(d * ratio)`), best scores first, ties to the lower channel (`top_k_positions`); None when none is pruned.

    layer_keys: the layer's keys, one tensor `[B, H_c, n, d]`, or one `[1, 1, n_h, d]` per head of a ragged layer
    (each head scored on its own entries, with the query heads it serves)."""
    dim = rows.shape[-1]
    kept = dim - int(dim * ratio)
    if kept == dim:
        return None
    if len(layer_keys) == 1:
        scores = key_channel_scores(rows, layer_keys[0])
    else:
        groups = rows.shape[1] // len(layer_keys)
        scores = torch.cat([key_channel_scores(rows[:, h * groups : (h + 1) * groups], keys)
                            for h, keys in enumerate(layer_keys)], dim=1)
    return top_k_positions(scores, kept)
