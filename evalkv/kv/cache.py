"""The KV cache that really shrinks: evicted entries leave memory, every entry remembers its true position.

Layout per layer: keys/values `[B, H_c, m, d]`, positions `[B, H_c, m]` (int64, the token's index in the sequence),
entries in position order. `H_c` is the model's KV-head count, or the query-head count once a method with
query-head granularity has selected per query head (the GQA expansion then costs real memory, and is reported).
Methods may attach per-entry state (`extras`, e.g. H2O's accumulated scores) that is gathered with the entries.

When heads keep different numbers of entries (AdaKV, CateKV), `keep_per_head` turns the layer ragged: it then holds
one single-head `LayerCache` per head in `heads`, so memory falls head by head (nothing is padded or masked).
Ragged layers serve batch size 1.

Once `prune_key_channels` has run (ThinK, evalkv/kv/channels.py), the first entries' keys are `pruned` (kept channels
only) and `keys` holds the later entries' keys at full width; values and positions still cover every entry. Such a
layer no longer evicts; `dense_keys()` gives its keys at full width with zeros in the pruned channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evalkv.kv.attention import repeat_kv
from evalkv.kv.channels import PrunedKeys, prune_keys


@dataclass
class LayerCache:
    keys: Tensor | None = None
    values: Tensor | None = None
    positions: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    heads: list[LayerCache] | None = None  # ragged layers: one single-head cache per head
    padded: bool = False  # a ragged layer laid out dense for decoding: padding entries sit at position -1
    pruned: PrunedKeys | None = None  # ThinK: the first entries' keys, kept channels only (`keys`: the later ones)

    @property
    def is_ragged(self) -> bool:
        return self.heads is not None

    @property
    def length(self) -> int:
        """Entries per head (the longest head's count in a ragged layer)."""
        if self.heads is not None:
            return max(head.length for head in self.heads)
        return 0 if self.values is None else self.values.shape[-2]

    @property
    def num_heads(self) -> int:
        if self.heads is not None:
            return len(self.heads)
        return 0 if self.keys is None else self.keys.shape[1]

    @property
    def entries(self) -> int:
        """Entries held over all heads, for one batch row (the first of a padded layer)."""
        return self.entries_of(0)

    def entries_of(self, row: int) -> int:
        """Entries batch row `row` holds over all heads (a padded layer's padding not counted)."""
        if self.heads is not None:
            return sum(head.length for head in self.heads)
        if self.padded:
            return int((self.positions[row] >= 0).sum())
        return self.num_heads * self.length

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held, every batch row (positions and method state are bookkeeping, reported
        apart; a padded layer counts its entries, not its padding)."""
        if self.heads is not None:
            return sum(head.nbytes for head in self.heads)
        if self.keys is None:
            return 0
        return sum(self.nbytes_of(row) for row in range(self.batch_size))

    def nbytes_of(self, row: int) -> int:
        """Bytes of the keys and values batch row `row` holds."""
        if self.heads is not None or self.keys is None:
            return self.nbytes if self.heads is not None else 0
        per_entry = self.keys.shape[-1] * (self.keys.element_size() + self.values.element_size())
        return self.entries_of(row) * per_entry - (0 if self.pruned is None else self.pruned.freed_nbytes())

    def pad_heads(self, length: int | None = None) -> None:
        """Lay a ragged layer out dense for decoding: each head's entries, then padding entries (zeros at position
        -1, which attention masks) up to `length` (default: the longest head's count). Decode steps append to every
        head at the end, as for a dense layer; the bytes held still count the entries only. A ragged layer whose
        keys lost channels stays ragged (it decodes head by head, alone)."""
        if self.channels_pruned:
            return
        if self.heads is None:
            if length is not None and length > self.length:
                self._extend_padding(length)
            return
        length = max(length or 0, self.length)
        first = self.heads[0].keys
        self.keys = first.new_zeros(1, len(self.heads), length, first.shape[-1])
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((1, len(self.heads), length), -1, dtype=torch.long, device=first.device)
        for h, head in enumerate(self.heads):
            self.keys[:, h, : head.length] = head.keys[:, 0]
            self.values[:, h, : head.length] = head.values[:, 0]
            self.positions[:, h, : head.length] = head.positions[:, 0]
        self.heads, self.padded = None, True

    def _extend_padding(self, length: int) -> None:
        """Padding entries at the end up to `length`: zero keys, values and method state, at position -1."""
        extra = length - self.length
        self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], extra, self.keys.shape[-1])], 2)
        self.values = torch.cat([self.values, torch.zeros_like(self.keys[:, :, -extra:])], 2)
        self.positions = torch.cat([self.positions, self.positions.new_full((*self.positions.shape[:2], extra), -1)],
                                   2)
        self.extras = {name: torch.cat([value, value.new_zeros(*value.shape[:-1], extra)], -1)
                       for name, value in self.extras.items()}
        self.padded = True

    @property
    def batch_size(self) -> int:
        if self.heads is not None:
            return 1
        return 1 if self.keys is None else self.keys.shape[0]

    def truncate(self, length: int) -> None:
        """Keep the first `length` entries (dense layers): drop entries appended last."""
        self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]
        self.positions = self.positions[..., :length]
        self.extras = {name: value[..., :length] for name, value in self.extras.items()}

    def clone(self) -> LayerCache:
        """An independent copy: its entries, positions, method state and heads."""
        return LayerCache(
            None if self.keys is None else self.keys.clone(), None if self.values is None else self.values.clone(),
            None if self.positions is None else self.positions.clone(),
            {name: value.clone() for name, value in self.extras.items()},
            None if self.heads is None else [head.clone() for head in self.heads], self.padded,
            None if self.pruned is None else self.pruned.clone(),
        )

    def stack_rows(self, parts: Sequence[LayerCache]) -> None:
        """Hold `parts` as the rows of one batch, in order: dense parts of equal shapes as they are; ragged, padded
        or shorter parts padded at the end to the longest part (padding entries at position -1, zero method state;
        rows of a slot cache, `Session.merge(fill_to=...)`, whose free slots the padding becomes)."""
        if any(part.heads is not None or part.padded or part.length != parts[0].length for part in parts):
            length = max(part.length for part in parts)
            for part in parts:
                part.pad_heads(length)
            self.padded = True
        self.keys = torch.cat([part.keys for part in parts])
        self.values = torch.cat([part.values for part in parts])
        self.positions = torch.cat([part.positions for part in parts])
        self.extras = {name: torch.cat([part.extras[name] for part in parts]) for name in parts[0].extras}
        if parts[0].pruned is not None:
            self.pruned = PrunedKeys.stack([part.pruned for part in parts])

    def row_entries(self, row: int, index: Tensor) -> LayerCache:
        """Entries `index` `[H_c, n]` of batch row `row` as a layer of their own: with the first `n` of `entries_first`,
        what a padded row would hold decoding alone (its entries in order, the padding left out)."""
        gather = index[..., None].expand(*index.shape, self.keys.shape[-1])
        return LayerCache(
            self.keys[row].gather(1, gather)[None], self.values[row].gather(1, gather)[None],
            self.positions[row].gather(1, index)[None],
            {name: value[row].gather(1, index[: value.shape[1]])[None] for name, value in self.extras.items()},
        )

    def entries_first(self) -> tuple[Tensor, list[int]]:
        """A padded layer's indices row by row and head by head, its entries in order and then its padding,
        `[B, H_c, m]`, with each row's count of entries. Every head of a row must hold as many (rows merged with
        `fill_to` and cut to one count per head; not a per-head budget's padding)."""
        padding = self.positions < 0
        counts = (~padding).sum(dim=-1)  # [B, H_c]
        if bool((counts != counts[:, :1]).any()):
            raise ValueError("a padded row holds different numbers of entries per head")
        order = torch.sort(padding.to(torch.uint8), dim=-1, stable=True).indices
        return order, counts[:, 0].tolist()

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows."""
        index = torch.tensor(rows, dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.extras = {name: value.index_select(0, index) for name, value in self.extras.items()}
        if self.pruned is not None:
            self.pruned = self.pruned.select_rows(index)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add new entries at the end; positions `[B, q]` are the tokens' true positions."""
        if self.heads is not None:
            groups = len(self.heads) // keys.shape[1]
            for index, head in enumerate(self.heads):
                source = slice(index // groups, index // groups + 1)
                head.append(keys[:, source], values[:, source], positions)
            return
        if self.keys is not None and self.keys.shape[1] != keys.shape[1]:
            groups = self.keys.shape[1] // keys.shape[1]
            keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        new_positions = positions[:, None, :].expand(keys.shape[0], keys.shape[1], positions.shape[-1])
        if self.keys is None:
            self.keys, self.values = keys, values
            self.positions = new_positions.contiguous()
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
            self.positions = torch.cat([self.positions, new_positions], dim=-1)

    def expand_heads(self, num_heads: int) -> None:
        """Give every query head its own copy of its KV head (docs/methods.md#shared-gqa-granularity)."""
        old = self.num_heads
        groups = num_heads // old
        if groups == 1:
            return
        self.keys, self.values = repeat_kv(self.keys, groups), repeat_kv(self.values, groups)
        self.positions = self.positions.repeat_interleave(groups, dim=1)
        # Per-KV-head state is copied to each query head; state already per query head (or shared) stays.
        self.extras = {
            name: value.repeat_interleave(groups, dim=1) if value.shape[1] == old > 1 else value
            for name, value in self.extras.items()
        }

    @property
    def channels_pruned(self) -> bool:
        """Whether key channels were pruned here (in a ragged layer: in its heads)."""
        if self.heads is not None:
            return any(head.pruned is not None for head in self.heads)
        return self.pruned is not None

    def prune_key_channels(self, kept: Tensor, recent: int) -> None:
        """Keep only channels `kept` `[B, H_c, k]` of every entry's key but the newest `recent` (ThinK), and free the
        rest (a ragged layer: head `h` keeps `kept[:, h]` of its own entries)."""
        if self.channels_pruned or self.padded:
            raise RuntimeError("key channels are pruned once, on the prompt's entries")
        if self.heads is not None:
            for index, head in enumerate(self.heads):
                head.prune_key_channels(kept[:, index : index + 1], recent)
            return
        self.pruned, self.keys = prune_keys(self.keys, kept, recent)

    def dense_keys(self) -> Tensor:
        """Every entry's key at full width, zeros in pruned channels (a copy when channels were pruned)."""
        if self.pruned is None:
            return self.keys
        return torch.cat([self.pruned.dense(), self.keys], dim=-2)

    def _refuse_pruned(self) -> None:
        if self.channels_pruned:
            raise RuntimeError("this layer's key channels were pruned (ThinK), after which nothing may be evicted; "
                               "channel pruning composes with methods that compress the prompt only")

    def keep(self, indices: Tensor) -> None:
        """Keep the entries at `indices` `[B, h, k]` (h = 1 for one set shared by all heads) and free the rest."""
        self._refuse_pruned()
        if self.heads is not None:
            self.keep_per_head([indices[0, min(h, indices.shape[1] - 1)] for h in range(self.num_heads)])
            return
        if indices.shape[1] > self.num_heads:
            self._keep_for_query_heads(indices)
            return
        shared = indices.shape[1] == 1
        if not shared and indices.shape[1] != self.num_heads:
            raise ValueError(f"keep indices have {indices.shape[1]} heads, the cache has {self.num_heads}")
        for name, value in self.extras.items():
            if value.shape[-1] != self.length or not (value.shape[1] == self.num_heads or shared):
                raise ValueError(f"method state {name!r} {tuple(value.shape)} does not match the cache entries")
        indices = indices.to(self.keys.device).expand(self.keys.shape[0], self.num_heads, indices.shape[-1])
        gather = indices[..., None].expand(*indices.shape, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.positions = self.positions.gather(2, indices)
        self.extras = {name: value.gather(2, indices[:, : value.shape[1]]) for name, value in self.extras.items()}
        if self.padded and bool((self.positions >= 0).all()):
            self.padded = False  # no padding kept: an ordinary dense layer again

    def _keep_for_query_heads(self, indices: Tensor) -> None:
        """`keep` with one index set per query head on a cache of KV heads: each query head gathers its entries from
        its KV head, read through a broadcast view, so the cache is never first copied for every query head (what
        `expand_heads` then `keep` would do: at 32K tokens, 4x the layer's KV written and read again). Method state
        per KV head goes with its entries the same way; state already per query head is gathered as it is."""
        batch, kv_heads, length, _ = self.keys.shape
        heads, kept = indices.shape[1], indices.shape[-1]
        if heads % kv_heads:
            raise ValueError(f"keep indices have {heads} heads, not a multiple of the cache's {kv_heads}")
        groups = heads // kv_heads
        indices = indices.to(self.keys.device).expand(batch, -1, -1)
        grouped = indices.reshape(batch, kv_heads, groups, kept)

        def take(source: Tensor) -> Tensor:  # [B, H_kv, m, *rest] -> [B, H_kv * G, k, *rest]
            rest = source.shape[3:]
            spread = source[:, :, None].expand(batch, kv_heads, groups, *source.shape[2:])
            index = grouped.reshape(*grouped.shape, *(1 for _ in rest)).expand(*grouped.shape, *rest)
            return spread.gather(3, index).reshape(batch, heads, kept, *rest)

        def take_state(name: str, value: Tensor) -> Tensor:
            if value.shape[-1] == length and value.shape[1] == kv_heads > 1:
                return take(value)
            if value.shape[-1] == length and value.shape[1] == heads:
                return value.gather(2, indices)
            raise ValueError(f"method state {name!r} {tuple(value.shape)} does not match the cache entries")

        self.extras = {name: take_state(name, value) for name, value in self.extras.items()}
        self.keys, self.values, self.positions = take(self.keys), take(self.values), take(self.positions)

    def keep_per_head(self, indices: Sequence[Tensor]) -> None:
        """Head h keeps `indices[h]` (1-D, ascending) of its entries; heads may keep different numbers.

        `len(indices)` is the KV-head count, or the query-head count (query-head granularity). Batch size 1.
        """
        self._refuse_pruned()
        if self.heads is None:
            if self.keys.shape[0] != 1:
                raise ValueError("per-head budgets (a ragged cache) need batch size 1")
            if self.extras:
                raise ValueError("a ragged cache does not carry method state; drop it before keep_per_head")
            if len(indices) > self.num_heads:
                self.expand_heads(len(indices))
            self.heads = [
                LayerCache(self.keys[:, h : h + 1], self.values[:, h : h + 1], self.positions[:, h : h + 1])
                for h in range(self.num_heads)
            ]
            self.keys = self.values = self.positions = None
        if len(indices) != len(self.heads):
            raise ValueError(f"keep_per_head got {len(indices)} index sets for {len(self.heads)} heads")
        for head, kept in zip(self.heads, indices):
            head.keep(kept.reshape(1, 1, -1))


class KVCache:
    """One `LayerCache` per model layer, plus the accounting that records report."""

    def __init__(self, num_layers: int, num_kv_heads: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.num_kv_heads = num_kv_heads

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def clone(self) -> KVCache:
        copy = KVCache(0, self.num_kv_heads)
        copy.layers = [layer.clone() for layer in self.layers]
        return copy

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size if self.layers else 1

    def kept_tokens(self, row: int = 0) -> float:
        """Mean entries per layer and KV head of batch row `row`; a query-head cache counts its repeated heads at
        their real memory."""
        entries = [layer.entries_of(row) / self.num_kv_heads for layer in self.layers]
        return sum(entries) / len(entries) if entries else 0.0

    def nbytes_of(self, row: int) -> int:
        """Bytes of keys and values batch row `row` holds."""
        return sum(layer.nbytes_of(row) for layer in self.layers)

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]
