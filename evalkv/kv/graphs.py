"""Decode steps over fixed-size KV buffers, captured once as a CUDA graph and replayed.

A decode step of a launch-bound model (32 layers x a dozen small kernels each) costs several times what reading the
weights does; replaying one captured graph removes the per-kernel launch and Python cost. A graph needs every
tensor to keep its address and shape, so `StaticDecoder` copies a batch's cache into buffers with room for the
tokens still to generate, writes each new key/value at slot `base + step` (`step` is a device tensor the graph
reads), and attends over the whole buffer with the unwritten slots masked out.

It serves caches that only grow while decoding: methods that compress the prompt and then append (no `before_step`
or `after_step` hook: `decodes_without_hooks`; no per-sample or per-layer state), dense layers, one device. No hook
runs around their decode steps, so a step is the model's forward alone and the graph replays exactly what the eager
step runs.
Unwritten slots hold zeros or earlier batches' finite entries: masked to -inf before the fp32 softmax, they weigh
exactly zero. The sums over the padded length may round differently from the unpadded eager step in bf16 (as
batched decoding's do); the CPU tests check identical tokens in fp32.

`decode_graphs="compile"` also compiles the step with `torch.compile` (inductor, default mode: evalkv captures the
graph itself) before capturing it, which fuses the small kernels a graph still launches one by one (RMSNorm's
pieces, RoPE, the masked softmax, SiLU x mul, residual adds). The whole step traces as one graph: the store reaches
the attention through the forward's keyword arguments, and every tensor the step reads keeps its shape, so a
decoder compiles once (dynamo's counters in tests/test_decode_graphs.py check it) and a new decoder of the same shape
reuses dynamo's code; `may_compile` keeps the compiled shapes within dynamo's per-process limit. Inductor fuses bf16
chains in fp32 and rounds once, so bf16 tokens may differ from eager ones.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from evalkv.kv import adapter
from evalkv.kv.attention import attend, repeat_kv
from evalkv.kv.cache import LayerCache
from evalkv.kv.view import ModelGeometry

# The backend of compiled steps; tests may set "aot_eager" (dynamo's tracing without inductor's code generation).
COMPILE_BACKEND = "inductor"
# (model, buffer shape) pairs whose step this process has compiled: dynamo's code cache is per process.
_COMPILED: set[tuple] = set()


def may_compile(model, key: tuple) -> bool:
    """Whether a decoder of shape `key` may compile its step. Dynamo keeps at most `recompile_limit` compiled versions
    of a function per process and past that runs it uncompiled without saying so; evalkv stops compiling new shapes
    there instead (with a warning), so that records saying `decode_compiled` ran compiled code."""
    entry = (id(model), key)
    if entry in _COMPILED:
        return True
    limit = torch._dynamo.config.recompile_limit
    if len(_COMPILED) >= limit:
        warnings.warn(f"{limit} decode-step shapes are compiled already (torch._dynamo.config.recompile_limit); "
                      "further shapes decode through graphs of the uncompiled step", RuntimeWarning, stacklevel=2)
        return False
    _COMPILED.add(entry)
    return True


def forget_compiled() -> None:
    """Empty the record of compiled shapes (with `torch._dynamo.reset()`, which empties dynamo's cache)."""
    _COMPILED.clear()


def decodes_without_hooks(method) -> bool:
    """Whether no hook of `method` runs around decode steps (it implements neither `before_step` nor `after_step`):
    its decode steps are the model's forward alone, which a captured graph replays exactly."""
    return method.before_step is None and method.after_step is None


def can_decode_static(session, device: torch.device) -> bool:
    """Whether `session`'s decode steps only append to dense layers on `device`, with no method state to update and
    full-width keys (a layer whose key channels were pruned decodes eagerly, `LayerCache.prune_key_channels`)."""
    if not decodes_without_hooks(session.method) or not session.decodes_from_entries():
        return False
    return all(layer.keys is not None and not layer.extras and layer.pruned is None and layer.keys.device == device
               for layer in session.cache.layers)


def dense_on(session, device: torch.device, in_slots: bool = False) -> bool:
    """Whether `session` decodes from dense layers on `device` with no per-sample method state (in_slots: in a
    `SlotDecoder`, where padded layers are dense too, `Session.decodes_from_entries`)."""
    return session.decodes_from_entries(in_slots) and all(layer.keys is not None and layer.keys.device == device
                                                          for layer in session.cache.layers)


class StaticDecoder:
    """A batch's cache in buffers with room for `steps` more tokens per row; `step` runs one decode step.

    graph: capture the step as a CUDA graph on its first call and replay it afterwards (CUDA only); otherwise run it
    eagerly (the same computation, which the tests compare with the ordinary decode on the CPU).
    compiled: run the step through `torch.compile` (compiled on the first call, before any capture).
    """

    def __init__(self, model, geometry: ModelGeometry, layers: list[LayerCache], steps: int, graph: bool,
                 compiled: bool = False, sizes: list[int] | None = None):
        """sizes: entries per head each layer's buffer holds (default: its entries + `steps`)."""
        first = layers[0].keys
        self.model = model
        self.geometry = geometry
        self.device = first.device
        self.graph_enabled = graph
        self.batch = first.shape[0]
        self.bases = [layer.length for layer in layers]
        self.steps = steps
        sizes = sizes or [base + steps for base in self.bases]
        self.keys = [first.new_zeros(self.batch, layer.num_heads, size, first.shape[-1])
                     for layer, size in zip(layers, sizes)]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        # Each slot's true position (-1: unwritten), so that the entries held can be read back (`unload`).
        self.entry_positions = [torch.full(keys.shape[:3], -1, dtype=torch.long, device=self.device)
                                for keys in self.keys]
        self.slots = [torch.arange(size, device=self.device) for size in sizes]
        self.base_tensors = [torch.tensor(base, device=self.device) for base in self.bases]
        # Padded layers (per-head budgets laid out dense) mask their padding by position.
        self.padded = [layer.padded for layer in layers]
        self.held_before: list[list[int]] = []  # per layer, the entries each row held before decoding (`load`)
        self.step_index = torch.zeros((), dtype=torch.long, device=self.device)
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.cache = adapter.make_cache(self, first.dtype, self.device)
        self.compiled = compiled
        self._model_step = _compile(adapter.forward) if compiled else adapter.forward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.taken = 0  # steps run since the last `load`

    @staticmethod
    def shape_key(layers: list[LayerCache], steps: int) -> tuple:
        """Decoders with equal keys have equal buffers: a captured graph serves any batch with this key."""
        first = layers[0].keys
        return (first.shape[0], first.shape[-1], first.dtype, str(first.device), steps,
                tuple((layer.num_heads, layer.length) for layer in layers))

    def load(self, layers: list[LayerCache], release: bool) -> None:
        """Copy a batch's entries into the buffers (release: free each source layer once copied). Slots past them are
        unwritten (position -1), as is a padded layer's padding."""
        self.held_before = [[layer.entries_of(row) for row in range(self.batch)] for layer in layers]
        for index, layer in enumerate(layers):
            length = layer.length  # this decoder's `bases`; a `SlotDecoder`'s batches may hold fewer
            self.keys[index][:, :, :length].copy_(layer.keys)
            self.values[index][:, :, :length].copy_(layer.values)
            self.entry_positions[index][:, :, :length].copy_(layer.positions)
            self.entry_positions[index][:, :, length:].fill_(-1)
            if release:
                layer.keys = layer.values = layer.positions = None
        self.step_index.zero_()
        self.taken = 0

    def step(self, ids: list[int], positions: list[int]) -> Tensor:
        """Feed one token per row at its true position; returns the logits `[B, vocab]` (valid until the next step)."""
        if self.taken >= self.steps:
            raise RuntimeError(f"the static decode buffers hold {self.steps} steps; all are used")
        self.ids.copy_(torch.tensor(ids, dtype=torch.long).reshape(-1, 1))
        self.positions.copy_(torch.tensor(positions, dtype=torch.long).reshape(-1, 1))
        if self.graph_enabled and self.graph is None:
            self._try_capture()
        if self.graph is None:
            self.logits = self._forward()
        else:
            self.graph.replay()
        self.step_index += 1
        self.taken += 1
        return self.logits

    def _forward(self) -> Tensor:
        return self._model_step(self.model, self.ids, self.positions, self.cache)

    def _try_capture(self) -> None:
        """Capture the step; where capture fails, warn and run this decoder's steps without a graph.

        Capture can fail for reasons outside evalkv (seen on an H100 under CUDA MPS with many client processes:
        cuBLASLt refused a matmul inside the capture). The failure invalidates the capture, not the data: the warm-up
        left the buffers ready for this step (`_warm_up`), so the eager step that follows computes exactly what a
        replay would have. Records say `decode_graph: false` for such batches."""
        try:
            self._capture()
        except RuntimeError as error:
            self.graph, self.graph_enabled = None, False
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a sticky error (a broken context) raises here, not later
            warnings.warn(f"CUDA-graph capture of the decode step failed ({str(error).splitlines()[0]}); this batch "
                          "shape decodes without a graph", RuntimeWarning, stacklevel=2)

    def _capture(self) -> None:
        # Uncaptured runs on a side stream first: cuBLAS, the allocator and a compiled step (dynamo's compile,
        # inductor's kernels) initialise lazily, which capture forbids; a compiled step runs twice, so that a guard
        # the first run invalidated recompiles here, and capture refuses to compile. The replay that follows the
        # capture runs this step again (`_warm_up` keeps that exact).
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._warm_up(2 if self.compiled else 1)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def _warm_up(self, runs: int) -> None:
        """Run the step `runs` times uncaptured, leaving the buffers such that the replay after the capture computes
        this step exactly: capturing records the step without running it, and the first replay runs it once more.
        An appending step's runs write the slots that the replay writes again identically; a step that evicts
        (`SlotDecoder`) would write its entry twice and evict twice, so what `_step_state` names is restored after
        each run (and if a run fails) and the replay finds the cache as it was before the step."""
        saved = [tensor.clone() for tensor in self._step_state()]
        for _ in range(runs):
            try:
                self._forward()
            finally:
                for tensor, before in zip(self._step_state(), saved):
                    tensor.copy_(before)

    def _step_state(self) -> list[Tensor]:
        """The tensors a step changes that running the same step again would not restore: none when it appends."""
        return []

    # The adapter's hooks: the model stores each layer's new key/value here, then attends through `attention`.

    def layer_length(self, layer_idx: int) -> int:
        # Fixed for the captured graph; the model reads it only for masks, which the evalkv attention does not use.
        return self.bases[layer_idx]

    def append(self, layer_idx: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        slot = (self.base_tensors[layer_idx] + self.step_index).reshape(1)
        groups = self.keys[layer_idx].shape[1] // keys.shape[1]  # a query-head cache holds each KV head per query
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        self.keys[layer_idx].index_copy_(2, slot, keys)
        self.values[layer_idx].index_copy_(2, slot, values)
        written = self.positions[:, None, :].expand(-1, keys.shape[1], -1)
        self.entry_positions[layer_idx].index_copy_(2, slot, written)
        return self.keys[layer_idx], self.values[layer_idx]

    def unload(self, layers: list[LayerCache], fed: int) -> None:
        """Put the entries held after `fed` decode tokens back into `layers` (batch rows that fed as many)."""
        for index, layer in enumerate(layers):
            end = self.bases[index] + fed
            layer.keys = self.keys[index][:, :, :end].clone()
            layer.values = self.values[index][:, :, :end].clone()
            layer.positions = self.entry_positions[index][:, :, :end].clone()

    def attention(self, layer_idx: int, query: Tensor, scaling: float) -> Tensor:
        """One query per row over the buffer; slots after this step's are masked. Returns `[B, H, 1, d]`."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.padded[layer_idx]:  # padding and unwritten slots alike sit at position -1
            return attend(query, keys, values, scaling, valid=self.entry_positions[layer_idx] >= 0)
        batch, num_heads, _, dim = query.shape
        kv_heads = keys.shape[1]
        grouped = query.reshape(batch, kv_heads, num_heads // kv_heads, dim)
        logits = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling  # [B, H_kv, G, slots]
        written = self.slots[layer_idx] <= self.base_tensors[layer_idx] + self.step_index
        logits = logits.masked_fill(~written, float("-inf"))
        probs = torch.softmax(logits, dim=-1).to(values.dtype)
        return torch.matmul(probs, values).reshape(batch, num_heads, 1, dim)

    def held(self, fed: int, row: int = 0) -> tuple[float, int]:
        """(kept tokens, KV bytes) of batch row `row` after `fed` decode tokens: what `KVCache` would report."""
        entries = [held[row] + keys.shape[1] * fed for keys, held in zip(self.keys, self.held_before)]
        element = self.keys[0].element_size() * self.keys[0].shape[-1] * 2
        kept = sum(entries) / self.geometry.num_kv_heads / len(entries)
        return kept, sum(entries) * element


def _compile(step):
    """`step` compiled as `decode_graphs="compile"` asks: inductor's default mode, since evalkv captures the CUDA graph
    itself (reduce-overhead would capture its own); static shapes; a graph break runs that part eagerly."""
    return torch.compile(step, backend=COMPILE_BACKEND, fullgraph=False, dynamic=False)


class SegmentDecoder(StaticDecoder):
    """A `StaticDecoder` for the forwards a method lets run without its step hook (`Method.segment_steps`: a scorer's
    steps between cuts): it also keeps the newest `kept_queries` steps' queries (after RoPE) in a ring per layer,
    `queries(n)`, so that the hook runs once over them afterwards (`Session.after_forwards`). Unwritten and padding
    slots are masked by position (rows of different prompt lengths merged padded, `Method.decodes_padded`)."""

    def __init__(self, model, geometry: ModelGeometry, layers: list[LayerCache], steps: int, graph: bool,
                 compiled: bool = False, kept_queries: int | None = None):
        super().__init__(model, geometry, layers, steps, graph=graph, compiled=compiled)
        self.padded = [True] * len(layers)
        first = layers[0].keys
        self.ring = min(steps, kept_queries or steps)
        self.query_buffers = [first.new_zeros(self.batch, geometry.num_heads, self.ring, geometry.head_dim)
                              for _ in layers]
        self.scalings: list[float | None] = [None] * len(layers)

    @staticmethod
    def shape_key(layers: list[LayerCache], steps: int, kept_queries: int | None = None) -> tuple:
        return ("segment", kept_queries, *StaticDecoder.shape_key(layers, steps))

    def attention(self, layer_idx: int, query: Tensor, scaling: float) -> Tensor:
        slot = torch.remainder(self.step_index, self.ring).reshape(1)
        self.query_buffers[layer_idx].index_copy_(2, slot, query)
        self.scalings[layer_idx] = scaling
        return super().attention(layer_idx, query, scaling)

    def queries(self, steps: int) -> list[Tensor]:
        """The queries of the newest `min(steps, ring)` of the `steps` steps since `load`, oldest first, per layer
        `[B, H, n, d]`."""
        if steps <= self.ring:
            return [buffer[:, :, :steps].clone() for buffer in self.query_buffers]
        start = steps % self.ring  # the oldest kept query's slot
        return [torch.cat([buffer[:, :, start:], buffer[:, :, :start]], dim=2) for buffer in self.query_buffers]
