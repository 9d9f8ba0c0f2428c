"""Drive a method over one synthetic attention layer with chosen keys, values and queries (no model)."""

from __future__ import annotations

import torch

from evalkv.kv.cache import LayerCache
from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState

GEOMETRY = ModelGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
SCALING = 8 ** -0.5


def identity_rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A RoPE table that rotates nothing (keys before RoPE = cached keys)."""
    return torch.ones(*positions.shape, 8), torch.zeros(*positions.shape, 8)


class SingleLayer:
    """One layer's cache under a method: each `forward` appends entries, runs `after_attention`, applies its keep."""

    def __init__(self, method, prompt_length: int, geometry: ModelGeometry = GEOMETRY):
        self.method, self.geometry = method, geometry
        self.cache = LayerCache()
        self.state: dict = {}
        self.sample = SampleState(input_ids=torch.zeros(1, prompt_length, dtype=torch.long),
                                  prompt_length=prompt_length)
        self.next_position = 0

    def forward(self, keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor, phase: Phase) -> dict:
        """keys/values `[1, H_kv, q, d]`, query `[1, H, q, d]`; returns the cache as the method saw it."""
        positions = torch.arange(self.next_position, self.next_position + keys.shape[2])[None, :]
        self.next_position += keys.shape[2]
        self.sample.phase = phase
        if phase is Phase.DECODE:
            self.sample.decode_step += 1
        self.cache.append(keys, values, positions)
        seen = {"keys": self.cache.keys.clone(), "values": self.cache.values.clone(),
                "positions": self.cache.positions.clone()}
        view = AttentionView(0, self.geometry, self.sample, query, positions, SCALING, self.cache, self.state,
                             output=torch.zeros_like(query), rotary=identity_rope)
        keep = self.method.after_attention(view)
        if keep is not None:
            self.cache.keep(keep)
        return seen


def window_scores(query: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """fp64 attention of the last `window` queries (prompt forward, causal) summed over rows, mean over each KV
    head's query heads: `[H_kv, n]`."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(groups, dim=1)
    n = keys.shape[2]
    logits = (query[:, :, -window:].double() @ keys.transpose(-1, -2)) * SCALING
    causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(dim=-2)[0]
    return probs.reshape(keys.shape[1] // groups, groups, n).mean(dim=1)
