"""One sample's pass through the model: the shrinking cache, the method's state, and the per-layer attention hook.

The transformers adapter calls `append` when a layer stores new keys/values and `attention` in place of the
model's attention function; everything a method needs (queries, keys after RoPE, true positions, the output)
passes through here, with no knowledge of transformers.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from evalkv.kv.attention import attend, attend_with_row_lse
from evalkv.kv.cache import KVCache, LayerCache
from evalkv.kv.channels import attend_pruned
from evalkv.kv.quant import Kivi, QuantizedLayer
from evalkv.kv.rope import RotaryTable
from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState


class Session:
    def __init__(
        self, method, geometry: ModelGeometry, input_ids: Tensor, backend: str = "sdpa", trace: bool = False,
        rotary: RotaryTable | None = None, output_projections: list[Tensor | None] | None = None,
        quantization: Kivi | None = None,
    ):
        self.method = method
        self.quantization = quantization  # KIVI: what the method keeps is quantised after each forward
        self.geometry = geometry
        self.backend = backend
        self.rotary = rotary
        self.output_projections = output_projections  # per layer: the o_proj weight (views read it)
        self.cache = KVCache(geometry.num_layers, geometry.num_kv_heads)
        self.layer_state: list[dict] = [{} for _ in range(geometry.num_layers)]
        self.sample = SampleState(input_ids=input_ids, prompt_length=input_ids.shape[-1])
        self.query_positions: Tensor | None = None
        self.batched = False  # rows of several samples (`merge`): the method must keep no per-sample state
        self.replay_score = None  # during a REPLAY forward: scores each layer's view (Method.rescore_prompt)
        self.replay_scores: list = []
        # With trace=True, the positions each layer attended to in each forward: [forward][layer] -> [B, H_c, m].
        self.trace: list[list[Tensor | None]] | None = [] if trace else None

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def batch_key(self, fill_to: int | None = None) -> tuple | None:
        """Sessions with equal keys can decode as rows of one batch (`merge`); None: this one decodes alone.

        Batching needs dense layers of equal shapes, and a method whose decode steps depend on nothing per sample
        but the cache entries, their `extras` and `Method.decode_group_key` (no per-layer or per-sample state).
        A method without a budget (the full cache) batches only with `fill_to`: its sessions differ in length.

        fill_to: the capacity of the slot cache this session will decode in (`Engine._slot_fill`, which checked that
        its dense layers hold at most that many entries), or the common length to which rows of a method that only
        appends are padded (`Engine._append_fill`, the full cache): layers key as if they held exactly that many, so
        that rows of different prompt lengths merge, padded at the end with entries at position -1
        (`merge(fill_to=...)`), which the decode buffers mask.
        """
        method = self.method
        padded_append = fill_to is not None and not method.acts_while_decoding
        if not ((method.requires_budget() or padded_append) and self.decodes_from_entries()):
            return None
        if self.quantization is not None and any(layer.is_ragged for layer in self.cache.layers):
            return None  # stacking pads ragged layers dense, which quantised heads are not
        state = tuple(tuple(sorted((name, tuple(value.shape[1:]), value.dtype) for name, value in layer.items()))
                      for layer in self.layer_state)  # batch-major tensors (`state_batches`), or nothing
        return (tuple(_layer_shape(layer, fill_to) for layer in self.cache.layers),
                method.decode_group_key(self.sample.prompt_length), self.sample.phase, state)

    def decodes_from_entries(self, in_slots: bool = False) -> bool:
        """Whether decode steps read nothing of this session but its layers' entries: no trace, no per-sample or
        per-layer method state, and no ragged layer unless the method runs no step hook (its ragged layers then
        decode padded, `LayerCache.pad_heads`) and no ragged layer whose key channels were pruned (not padded):
        what batched and CUDA-graph decoding both need.

        in_slots: decoded by a `SlotDecoder`, for which padding entries are free slots, masked by position and
        skipped by the method's `evict_slot` (rows merged with `fill_to`): padded layers are fine there."""
        ragged = any(layer.is_ragged or (layer.padded and not in_slots) for layer in self.cache.layers)
        thinned = any(layer.is_ragged and layer.channels_pruned for layer in self.cache.layers)  # never padded
        return (self.trace is None and not (self.has_state() and not self.state_batches())
                and not (ragged and self.method.acts_while_decoding) and not thinned)

    def needs_slots(self) -> bool:
        """Whether only a `SlotDecoder` may decode this session: padded layers under a method with step hooks (rows
        merged with `fill_to`) that would read the padding as entries (not `Method.decodes_padded`)."""
        return (self.method.acts_while_decoding and not self.method.decodes_padded()
                and any(layer.padded for layer in self.cache.layers))

    def pad_ragged(self) -> None:
        """Lay ragged layers out dense for decoding (a method without step hooks: nothing evicts from them again)."""
        if (self.trace is None and self.quantization is None and self.method.before_step is None
                and self.method.after_step is None):
            for layer in self.cache.layers:
                layer.pad_heads()

    def has_state(self) -> bool:
        """Whether the method keeps anything about this sample beyond the cache entries and their extras."""
        return bool(self.sample.state) or any(self.layer_state)

    def state_batches(self) -> bool:
        """Whether rows of several samples may hold this state side by side: a method with `batched_state`, no
        sample-wide state, and per-layer state of tensors only (batch-major: stacked by `merge`, selected by
        `keep_rows`)."""
        return (self.method.batched_state and not self.sample.state
                and all(isinstance(value, Tensor) for state in self.layer_state for value in state.values()))

    @classmethod
    def merge(cls, sessions: list[Session], fill_to: int | None = None) -> Session:
        """One session holding `sessions` as batch rows, in order (all with the same `batch_key(fill_to)`).

        fill_to: rows' layers may be shorter than this capacity or common length; the shorter ones are padded at the
        end with entries at position -1: a slot cache's free slots (only a `SlotDecoder` decodes those rows,
        `needs_slots`), or a full cache's padding, which `StaticDecoder` masks by position."""
        first = sessions[0]
        key = first.batch_key(fill_to)
        if key is None or any(session.batch_key(fill_to) != key for session in sessions):
            raise ValueError("these sessions cannot decode as one batch (their batch keys differ)")
        merged = cls(first.method, first.geometry, first.sample.input_ids, backend=first.backend, rotary=first.rotary,
                     output_projections=first.output_projections, quantization=first.quantization)
        # Decode steps read prompt_length only through decode_group_key, equal for every row by the check above.
        merged.sample = SampleState(
            input_ids=first.sample.input_ids, prompt_length=first.sample.prompt_length, phase=first.sample.phase,
            last_chunk=first.sample.last_chunk, decode_step=first.sample.decode_step,
            steps_after_prompt=first.sample.steps_after_prompt,
        )
        for index, layer in enumerate(merged.cache.layers):
            parts = [session.cache.layers[index] for session in sessions]
            if isinstance(parts[0], QuantizedLayer):
                merged.cache.layers[index] = QuantizedLayer.stacked(parts)
            else:
                layer.stack_rows(parts)
        merged.layer_state = [{name: torch.cat([session.layer_state[index][name] for session in sessions])
                               for name in state} for index, state in enumerate(first.layer_state)]
        merged.batched = True
        return merged

    def fork(self) -> Session:
        """An independent copy of this session as it stands (its cache, the method's state): a compressed context
        answers several questions, each from its own copy, so no answer's tokens reach the next question."""
        forked = Session(self.method, self.geometry, self.sample.input_ids, backend=self.backend, rotary=self.rotary,
                         output_projections=self.output_projections, quantization=self.quantization)
        forked.cache = self.cache.clone()
        forked.layer_state = [_copied(state) for state in self.layer_state]
        forked.sample = dataclasses.replace(self.sample, state=_copied(self.sample.state))
        return forked

    def keep_rows(self, rows: list[int]) -> None:
        """Drop the batch rows not in `rows` (samples that finished decoding) and free their entries and state."""
        for layer in self.cache.layers:
            layer.select_rows(rows)
        self.layer_state = [{name: value.index_select(0, torch.tensor(rows, dtype=torch.long, device=value.device))
                             for name, value in state.items()} for state in self.layer_state]

    def begin_forward(self, phase: Phase, positions: Tensor, last_chunk: bool = True) -> None:
        self.sample.phase = phase
        self.sample.last_chunk = last_chunk
        self.query_positions = positions
        if phase is Phase.REPLAY:  # not a step of the sequence: no counters, no trace
            self.replay_scores = [None] * self.geometry.num_layers
            return
        if phase is Phase.DECODE:
            self.sample.decode_step += 1
        if phase is not Phase.PREFILL:
            self.sample.steps_after_prompt += 1
        if self.trace is not None:
            self.trace.append([None] * self.geometry.num_layers)

    def layer_length(self, layer_idx: int) -> int:
        return self.cache.layers[layer_idx].length

    def append(self, layer_idx: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.cache.layers[layer_idx]
        layer.append(keys, values, self.query_positions.to(keys.device))  # layers may sit on several GPUs
        # The model's attention is evalkv's, which reads the layer itself: a quantised layer is not de-quantised here.
        return (keys, values) if layer.is_ragged or isinstance(layer, QuantizedLayer) else (layer.keys, layer.values)

    def attention(self, layer_idx: int, query: Tensor, scaling: float) -> Tensor:
        """Run the method's hooks around the model's attention for one layer; returns `[B, H, q, d]`.

        A prompt forward runs `compress_prompt` after the attention, then, after the prompt's last forward,
        `select_key_channels` (ThinK's channel pruning of the kept entries' keys); every later forward (the suffix,
        decode steps) runs `before_step` before it and `after_step` after it. A hook the method does not implement
        is None."""
        layer = self.cache.layers[layer_idx]
        view = self._view(layer_idx, query, scaling)
        if self.sample.phase is Phase.REPLAY:  # re-read tokens: scored, then dropped; no hook runs
            view.output = self._attend(layer, query, scaling)
            self.replay_scores[layer_idx] = self.replay_score(view)
            layer.truncate(layer.length - query.shape[-2])
            return view.output
        prompt = self.sample.phase is Phase.PREFILL
        before = None if prompt else self.method.before_step
        if before is not None:
            keep = before(view)
            if keep is not None:
                _apply(layer, keep)
                self._check_new_tokens_kept(layer_idx, query.shape[-2])
        output = self._attend(layer, query, scaling, view if prompt and self.method.reads_row_lse else None)
        if self.trace is not None:
            self.trace[-1][layer_idx] = (
                [head.positions.clone() for head in layer.heads] if layer.is_ragged else layer.positions.clone()
            )
        after = self.method.compress_prompt if prompt else self.method.after_step
        if after is not None:
            view.output = output
            keep = after(view)
            if keep is not None:
                _apply(layer, keep)
        if prompt and self.sample.last_chunk:
            self._prune_key_channels(layer, view)
        if self.quantization is not None and self.sample.last_chunk:  # the whole prompt's eviction decided exactly
            self.cache.layers[layer_idx] = self.quantization.settle(layer)
        if self.batched and self.has_state() and not self.state_batches():
            raise RuntimeError(f"{self.method.name}: a hook kept per-sample state while samples decoded as one batch; "
                               "keep it from the prompt on (view.state), so that the sample decodes alone")
        return output

    def after_forwards(self, queries: list[Tensor], positions: Tensor, scalings: list[float], count: int) -> None:
        """Catch up on `count` decode forwards that ran without the step hook (`Method.segment_steps`, over a
        `SegmentDecoder`'s buffers): their entries are in the layers now; the sample's counters advance by `count`,
        then each layer's `after_step` runs once with their newest queries (`queries[layer]` `[B, H, n, d]` at
        `positions` `[B, n]`, n <= count, at least `Method.segment_queries`; the attention's `scalings[layer]`), as
        the method's eager steps would have run it after each."""
        self.sample.phase = Phase.DECODE
        self.sample.decode_step += count
        self.sample.steps_after_prompt += count
        self.query_positions = positions
        for layer_idx, (layer, query, scaling) in enumerate(zip(self.cache.layers, queries, scalings)):
            keep = self.method.after_step(self._view(layer_idx, query, scaling))
            if keep is not None:
                _apply(layer, keep)

    def _view(self, layer_idx: int, query: Tensor, scaling: float) -> AttentionView:
        """What a hook of layer `layer_idx` sees: `query` at this forward's positions over the layer's cache."""
        return AttentionView(
            layer_idx=layer_idx, geometry=self.geometry, sample=self.sample, query=query,
            query_positions=self.query_positions.to(query.device), scaling=scaling, cache=self.cache.layers[layer_idx],
            state=self.layer_state[layer_idx], rotary=self.rotary,
            output_projection=None if self.output_projections is None else self.output_projections[layer_idx],
        )

    def apply(self, layer_idx: int, keep) -> None:
        """Keep these entries of layer `layer_idx` (a method's decision outside a hook: `rescore_prompt`)."""
        _apply(self.cache.layers[layer_idx], keep)

    def _prune_key_channels(self, layer: LayerCache, view: AttentionView) -> None:
        select = getattr(self.method, "select_key_channels", None)
        if select is None:
            return
        if self.method.before_step is not None or self.method.after_step is not None:
            raise RuntimeError(f"{self.method.name}: key channel pruning needs a method that compresses the prompt "
                               "only; this one evicts while decoding")
        choice = select(view)
        if choice is not None:
            layer.prune_key_channels(choice.kept, choice.recent)

    def _attend(self, layer: LayerCache, query: Tensor, scaling: float, view: AttentionView | None = None) -> Tensor:
        """The attention of `query` over the layer; with `view` (a prompt forward of a method with `reads_row_lse`),
        where the attention returns each row's log-sum-exp too, it is kept in `view.row_lse`."""
        if view is not None and _plain(layer):
            output, view.row_lse = attend_with_row_lse(query, layer.keys, layer.values, scaling, self.backend)
            return output
        if layer.padded:
            return attend(query, layer.keys, layer.values, scaling, self.backend, valid=layer.positions >= 0)
        if not layer.is_ragged:
            return self._attend_dense(layer, query, scaling)
        groups = query.shape[1] // layer.num_heads
        return torch.cat([
            self._attend_dense(head, query[:, h * groups : (h + 1) * groups], scaling)
            for h, head in enumerate(layer.heads)
        ], dim=1)

    def _attend_dense(self, layer: LayerCache, query: Tensor, scaling: float) -> Tensor:
        if layer.pruned is not None:
            return attend_pruned(query, layer.pruned, layer.keys, layer.values, scaling)
        return attend(query, layer.keys, layer.values, scaling, self.backend)

    def _check_new_tokens_kept(self, layer_idx: int, num_new: int) -> None:
        layer = self.cache.layers[layer_idx]
        for positions in [head.positions for head in layer.heads] if layer.is_ragged else [layer.positions]:
            tail = positions[..., -num_new:]
            if not torch.equal(tail, self.query_positions[:, None, :].to(tail.device).expand_as(tail)):
                raise RuntimeError(
                    f"{self.method.name}: an eviction before attention in layer {layer_idx} dropped the tokens "
                    "being fed"
                )


def _plain(layer: LayerCache) -> bool:
    """A layer of dense entries that `attend` reads as they are (no per-head padding or lists, pruned key channels
    or quantised storage)."""
    return not (layer.padded or layer.is_ragged or layer.pruned is not None or isinstance(layer, QuantizedLayer))


def _layer_shape(layer: LayerCache, fill_to: int | None = None) -> tuple:
    """What layers of batch rows must share: their shapes (with `fill_to`, the entries' count replaced by it), or for
    per-head budgets (padded to a common length when the rows merge) their head count."""
    if isinstance(layer, QuantizedLayer):
        return layer.shape_key()
    if layer.is_ragged or layer.padded:
        keys = layer.heads[0].keys if layer.is_ragged else layer.keys
        return ("per-head", layer.num_heads, keys.dtype, str(keys.device))

    def filled(shape: torch.Size) -> tuple:  # [H_c, m, ...] or extras' [h, m]: m is the entries' count
        return tuple(shape) if fill_to is None else (shape[0], fill_to, *shape[2:])

    return (filled(layer.keys.shape[1:]), layer.keys.dtype, str(layer.keys.device),
            tuple((name, filled(value.shape[1:])) for name, value in sorted(layer.extras.items())),
            None if layer.pruned is None else tuple(layer.pruned.keys.shape[1:]))


def _copied(value):
    """A deep copy of method state: tensors cloned (inside inference mode too), containers rebuilt."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return copy.deepcopy(value)


def _apply(layer: LayerCache, keep: Tensor | list[Tensor]) -> None:
    """A method's decision: indices `[B, h, k]`, or one 1-D index tensor per head (per-head budgets)."""
    if isinstance(keep, list):
        layer.keep_per_head(keep)
    else:
        layer.keep(keep)
