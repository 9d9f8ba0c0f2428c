"""Decode steps of methods that evict while decoding, over a fixed-capacity cache whose shape never changes.

A method that holds its cache at a capacity C while decoding (H2O, TOVA, StreamingLLM, ...) evicts one entry per
step once full. Here each layer's cache is a buffer of C + 1 slots: the step's new entry is written into the free
slot, the attention runs over every occupied slot (attention is order-free, so slots need no position order; a
slot-to-position map carries the true positions), then the method's `evict_slot` names the slot to free, which the
next step's entry takes. Every tensor keeps its shape and address, so the whole step is captured as a CUDA graph and
replayed, batched across samples (evalkv/kv/graphs.py does the capture).

A method takes this path by implementing `evict_slot(view: SlotView) -> [B, h]` (h = 1 for one slot per layer, or
the cache's head count): the slot its `after_step` would evict, computed from fixed-shape tensors (no host reads).
It must agree with the method's ordinary step; tests/test_method_api.py runs every registered method through both
paths and compares tokens, kept sets and bytes. Per-entry method state (`LayerCache.extras`, e.g. H2O's accumulated
scores) lives in slot-aligned buffers (`SlotView.state`) that the method updates in place; a new entry's state starts
at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.kv.attention import repeat_kv
from evalkv.kv.cache import LayerCache
from evalkv.kv.graphs import StaticDecoder
from evalkv.kv.view import ModelGeometry


@dataclass
class SlotView:
    """One layer after a decode step's attention, as `evict_slot` sees it (batch rows, fixed shapes)."""

    layer_idx: int
    geometry: ModelGeometry
    probs: Tensor  # [B, H, S] fp32: this step's attention of each query head over the slots (0 on free slots)
    positions: Tensor  # [B, H_c, S] the true position held in each slot, -1 where free
    newest: Tensor  # [B, 1] this step's position (its entry is in the cache)
    capacity: int  # entries per head the method keeps
    state: dict[str, Tensor]  # the method's per-entry state, slot-aligned `[B, h, S]`; update in place

    @property
    def occupied(self) -> Tensor:
        return self.positions >= 0


def implements_slots(method) -> bool:
    """Whether the method evicts while decoding through `evict_slot` alone (no hook before a step's attention)."""
    return getattr(method, "evict_slot", None) is not None and method.before_step is None


class SlotDecoder(StaticDecoder):
    """A batch's cache in C + 1 slots per head and layer; `step` runs one decode step and evicts through `method`.

    Rows stay in the batch until the last one stops; a row's kept entries are those of a one-row decode. Decoding
    has no step limit (the buffers never grow)."""

    def __init__(self, model, geometry: ModelGeometry, layers: list[LayerCache], method, capacity: int, graph: bool,
                 compiled: bool = False):
        first = layers[0].keys
        self.method = method
        self.capacity = capacity
        sizes = [max(layer.length, capacity) + 1 for layer in layers]
        super().__init__(model, geometry, layers, steps=0, graph=graph, compiled=compiled, sizes=sizes)
        self.steps = float("inf")
        batch = first.shape[0]
        self.free = [torch.zeros(batch, layer.num_heads, 1, dtype=torch.long, device=self.device) for layer in layers]
        self.state = [{name: torch.zeros(*value.shape[:2], size, dtype=value.dtype, device=self.device)
                       for name, value in layer.extras.items()} for layer, size in zip(layers, sizes)]

    @staticmethod
    def shape_key(layers: list[LayerCache], capacity: int) -> tuple:
        """The buffers' shapes: C + 1 slots for any batch whose layers hold at most C entries, whatever its prompt
        lengths, so that one decoder (and its captured graph) serves every such batch."""
        first = layers[0].keys
        return ("slots", first.shape[0], first.shape[-1], first.dtype, str(first.device), capacity,
                tuple((layer.num_heads, max(layer.length, capacity),
                       tuple(sorted((name, tuple(value.shape[1:-1])) for name, value in layer.extras.items())))
                      for layer in layers))

    def load(self, layers: list[LayerCache], release: bool) -> None:
        """The batch's entries in the first slots; each row and head's first free slot is its count of entries
        (rows merged with `fill_to` hold their padding, free slots, at the end)."""
        for index, layer in enumerate(layers):
            self.free[index].copy_((layer.positions >= 0).sum(dim=-1, keepdim=True))
            for name, value in layer.extras.items():
                self.state[index][name].zero_()
                self.state[index][name][..., : layer.length].copy_(value)
        super().load(layers, release)

    def append(self, layer_idx: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        buffer = self.keys[layer_idx]
        groups = buffer.shape[1] // keys.shape[1]  # a query-head cache holds each KV head per query head
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        free = self.free[layer_idx]  # [B, H_c, 1]
        index = free[..., None].expand(*free.shape, buffer.shape[-1])
        buffer.scatter_(2, index, keys)
        self.values[layer_idx].scatter_(2, index, values)
        self.entry_positions[layer_idx].scatter_(2, free, self.positions[:, None, :].expand_as(free))
        for value in self.state[layer_idx].values():
            value.scatter_(2, free[:, : value.shape[1]].expand(-1, value.shape[1], -1), 0)
        return buffer, self.values[layer_idx]

    def attention(self, layer_idx: int, query: Tensor, scaling: float) -> Tensor:
        """One query per row over the occupied slots, then the method's eviction. Returns `[B, H, 1, d]`."""
        keys, values, positions = self.keys[layer_idx], self.values[layer_idx], self.entry_positions[layer_idx]
        batch, num_heads, _, dim = query.shape
        heads = keys.shape[1]
        grouped = query.reshape(batch, heads, num_heads // heads, dim)
        logits = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling  # [B, H_c, G, S]
        logits = logits.masked_fill(positions[:, :, None, :] < 0, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        output = torch.matmul(probs.to(values.dtype), values).reshape(batch, num_heads, 1, dim)
        view = SlotView(layer_idx, self.geometry, probs.reshape(batch, num_heads, -1), positions, self.positions,
                        self.capacity, self.state[layer_idx])
        evicted = self.method.evict_slot(view).reshape(batch, -1, 1).expand(batch, heads, 1)
        full = (positions >= 0).sum(dim=-1, keepdim=True) > self.capacity  # [B, H_c, 1]
        first_free = (positions < 0).to(torch.uint8).argmax(dim=-1, keepdim=True)
        positions.scatter_(2, evicted, torch.where(full, -1, positions.gather(2, evicted)))
        self.free[layer_idx].copy_(torch.where(full, evicted, first_free))
        return output

    def _step_state(self) -> list[Tensor]:
        """A step writes its entry into the free slot, evicts another and updates the method's state: the slots'
        positions, the next free slot and that state restore the cache as it was (the written keys and values sit
        in a slot marked free again, where the next run of the step writes them anew)."""
        return [*self.entry_positions, *self.free, *(value for state in self.state for value in state.values())]

    def held(self, fed: int, row: int = 0) -> tuple[float, int]:
        """Row `row`'s own entries grow by one per head and step up to the capacity (a row loaded above it, after a
        suffix, stays at its count)."""
        entries = []
        for keys, held in zip(self.keys, self.held_before):
            heads, before = keys.shape[1], held[row]
            entries.append(min(before + heads * fed, heads * self.capacity) if before <= heads * self.capacity
                           else before)
        element = self.keys[0].element_size() * self.keys[0].shape[-1] * 2
        kept = sum(entries) / self.geometry.num_kv_heads / len(entries)
        return kept, sum(entries) * element

    def unload(self, layers: list[LayerCache], fed: int) -> None:
        """The occupied slots in position order (one row), with the method's state: what an eager decode holds."""
        for index, layer in enumerate(layers):
            positions = self.entry_positions[index]
            order = torch.sort(torch.where(positions < 0, torch.iinfo(torch.long).max, positions), dim=-1).indices
            kept = int((positions[0, 0] >= 0).sum())
            order = order[..., :kept]
            gather = order[..., None].expand(*order.shape, self.keys[index].shape[-1])
            layer.keys = self.keys[index].gather(2, gather)
            layer.values = self.values[index].gather(2, gather)
            layer.positions = positions.gather(2, order)
            layer.extras = {name: value.gather(2, order[:, : value.shape[1]])
                            for name, value in self.state[index].items()}
