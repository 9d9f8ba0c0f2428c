"""The per-layer view of one attention call that the engine hands to a method."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from evalkv.kv.cache import LayerCache
from evalkv.kv.rope import RotaryTable, unrotate_keys


class Phase(str, Enum):
    PREFILL = "prefill"  # prompt tokens: one forward, or one chunk of a chunked prefill
    SUFFIX = "suffix"  # tokens fed after the prompt was compressed (query-agnostic question): step hooks run
    DECODE = "decode"  # one generated token
    REPLAY = "replay"  # tokens re-read after the prompt (Method.rescore_prompt): dropped after each layer's attention


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def gqa_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class SampleState:
    """Where one sample's generation stands; shared by all layers."""

    input_ids: Tensor  # [B, n] the prompt
    prompt_length: int
    phase: Phase = Phase.PREFILL
    last_chunk: bool = True  # this prefill forward ends the prompt
    decode_step: int = 0  # s-th decode forward (feeding the s-th generated token); 0 during prefill
    steps_after_prompt: int = 0  # forwards after the prompt so far, this one included (the suffix, then decoding)
    state: dict[str, Any] = field(default_factory=dict)  # method state shared across layers


@dataclass
class AttentionView:
    """One layer's attention call as a method sees it."""

    layer_idx: int
    geometry: ModelGeometry
    sample: SampleState
    query: Tensor  # [B, H, q, d], after RoPE
    query_positions: Tensor  # [B, q] true positions of the new tokens
    scaling: float
    cache: LayerCache  # already holds the q new entries at its end
    state: dict[str, Any]  # the method's per-layer state for this sample
    output: Tensor | None = None  # [B, H, q, d] attention output before o_proj (hooks after the attention only)
    rotary: RotaryTable | None = None  # the model's RoPE table (Engine runs), for keys_before_rope
    output_projection: Tensor | None = None  # the layer's o_proj weight `[hidden, H * d]` (Engine runs), CriticalKV
    # [B, H, q] each new row's base-2 log-sum-exp over the layer's entries, where the model's attention returned it
    # (a whole prompt in one forward on CUDA, for methods with `reads_row_lse`; attention.attend_with_row_lse)
    row_lse: Tensor | None = None

    def keys_before_rope(self, start: int = 0) -> Tensor:
        """Cache entries `start:` with RoPE undone (position-free keys), fp32 `[B, H_c, m - start, d]`."""
        if self.rotary is None:
            raise RuntimeError(f"layer {self.layer_idx}: no RoPE table in this view (models run through Engine "
                               "provide the model's)")
        return unrotate_keys(self.keys[..., start:, :], self.positions[..., start:], self.rotary)

    @property
    def phase(self) -> Phase:
        return self.sample.phase

    @property
    def keys(self) -> Tensor:
        """`[B, H_c, m, d]`; once key channels were pruned (ThinK), a full-width copy with zeros in them."""
        return self._dense().dense_keys()

    @property
    def values(self) -> Tensor:
        return self._dense().values

    @property
    def positions(self) -> Tensor:
        return self._dense().positions

    def _dense(self) -> LayerCache:
        if self.cache.is_ragged:
            raise RuntimeError(
                f"layer {self.layer_idx} keeps a different number of entries per head; read view.cache.heads"
            )
        return self.cache

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def num_new(self) -> int:
        return self.query.shape[-2]
