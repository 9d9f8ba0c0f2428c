"""The reference that pins eviction semantics: a full-cache forward in which evicted keys are masked out.

`masked_reference_logits` replays a compressed run's forwards over an uncompressed cache with eager fp32
attention, letting each layer's query heads see only the positions the compressed run attended to (its trace).
If the compressed cache holds the right keys and values at the right RoPE positions, both runs give the same
logits (docs/methods.md#shared-masked-reference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evalkv.kv import adapter
from evalkv.kv.session import Session
from evalkv.kv.view import ModelGeometry, Phase


class _KeepEverything:
    """The full cache as the session sees a method: no hook, no budget."""

    name = "full"
    compress_prompt = before_step = after_step = None

    @staticmethod
    def requires_budget() -> bool:
        return False


class _MaskedSession(Session):
    """Keeps every entry (the full-cache method) and masks, per query head, what the traced run did not see."""

    def __init__(self, geometry: ModelGeometry, prompt: Tensor, visible: list[list[Tensor]]):
        super().__init__(_KeepEverything(), geometry, prompt)
        self.visible = visible
        self.forward_index = -1

    def begin_forward(self, phase: Phase, positions: Tensor, last_chunk: bool = True) -> None:
        super().begin_forward(phase, positions, last_chunk)
        self.forward_index += 1

    def attention(self, layer_idx: int, query: Tensor, scaling: float) -> Tensor:
        layer = self.cache.layers[layer_idx]
        num_heads = query.shape[1]
        keys = layer.keys.repeat_interleave(num_heads // layer.num_heads, dim=1)
        values = layer.values.repeat_interleave(num_heads // layer.num_heads, dim=1)
        key_positions = layer.positions[:, :1, :]  # the full cache: same positions in every head
        seen = self.visible[self.forward_index][layer_idx]  # [B, H_c, k], or per head [B, 1, k_h] (ragged)
        per_head = seen if isinstance(seen, list) else list(seen.split(1, dim=1))
        allowed = torch.cat([(key_positions[:, :, None, :] == head[..., None]).any(dim=-2) for head in per_head], 1)
        allowed = allowed.repeat_interleave(num_heads // allowed.shape[1], dim=1)  # [B, H, m]
        causal = key_positions[:, :, None, :] <= self.query_positions[:, None, :, None]  # [B, 1, q, m]
        logits = torch.matmul(query.double(), keys.double().transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~(allowed[:, :, None, :] & causal), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.matmul(probs, values.double()).to(query.dtype)


@torch.inference_mode()
def masked_reference_logits(
    model, forwards: Sequence[Tensor], positions: Sequence[Tensor], visible: list[list[Tensor]]
) -> list[Tensor]:
    """Last-position logits of each forward (`forwards[i]` ids `[1, q]` at `positions[i]`), masked by `visible`."""
    adapter.install(model)
    session = _MaskedSession(adapter.geometry(model), forwards[0], visible)
    cache = adapter.make_cache(session)
    logits = []
    for ids, pos in zip(forwards, positions):
        session.begin_forward(Phase.PREFILL, pos)
        logits.append(adapter.forward(model, ids, pos, cache))
    return logits
