"""One attention layer under a method, with chosen or random keys, values and queries (no model), driven through
evalkv's `Session` exactly as a model's forward drives it: each forward appends its keys and values, then the session
runs the method's hooks around the attention. Method tests compare what it kept with brute-force computations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.kv.session import Session
from evalkv.kv.view import ModelGeometry, Phase

GEOMETRY = ModelGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
SCALING = 8 ** -0.5


def identity_rope(positions: Tensor) -> tuple[Tensor, Tensor]:
    """A RoPE table that rotates nothing (keys before RoPE = cached keys)."""
    return torch.ones(*positions.shape, 8), torch.zeros(*positions.shape, 8)


@dataclass
class Step:
    query: Tensor  # [1, H, q, d]
    keys: Tensor  # the cache the attention saw (after before_step), [1, H_c, m, d]
    values: Tensor
    positions: Tensor  # [1, H_c, m]
    output: Tensor  # [1, H, q, d]
    appended_keys: Tensor  # the cache the hooks started from (the new entries appended), [1, H_c, m', d]
    appended_values: Tensor
    appended_positions: Tensor


class _RecordingSession(Session):
    """A session that remembers what each attention read."""

    def _attend(self, layer, query, scaling, view=None):
        self.attended = (layer.keys.clone(), layer.values.clone(), layer.positions.clone())
        return super()._attend(layer, query, scaling, view)


class SingleLayer:
    def __init__(self, method, prompt_length: int, geometry: ModelGeometry = GEOMETRY, seed: int = 0,
                 input_ids: Tensor | None = None, query_scale: float = 3.0,
                 output_projections: list[Tensor] | None = None, quantization=None):
        ids = torch.zeros(1, prompt_length, dtype=torch.long) if input_ids is None else input_ids
        self.geometry = geometry
        self.session = _RecordingSession(method, geometry, ids, backend="eager", rotary=identity_rope,
                                         output_projections=output_projections, quantization=quantization)
        self.scaling = geometry.head_dim ** -0.5
        self.query_scale = query_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.next_position = 0

    @property
    def cache(self):
        return self.session.cache.layers[0]

    @property
    def state(self) -> dict:
        return self.session.layer_state[0]

    @property
    def sample(self):
        return self.session.sample

    def forward(self, keys: Tensor, values: Tensor, query: Tensor, phase: Phase) -> Step:
        """keys/values `[1, H_kv, q, d]`, query `[1, H, q, d]` at the next q positions."""
        positions = torch.arange(self.next_position, self.next_position + keys.shape[2])[None, :]
        self.next_position += keys.shape[2]
        self.session.begin_forward(phase, positions)
        self.session.append(0, keys, values)
        appended = (self.cache.keys.clone(), self.cache.values.clone(), self.cache.positions.clone())
        output = self.session.attention(0, query, self.scaling)
        return Step(query, *self.session.attended, output, *appended)

    def random(self, q_len: int, phase: Phase) -> Step:
        """A forward of `q_len` random keys, values and (scaled) queries."""
        keys, values = self._random(self.geometry.num_kv_heads, q_len), self._random(self.geometry.num_kv_heads, q_len)
        return self.forward(keys, values, self._random(self.geometry.num_heads, q_len, self.query_scale), phase)

    def prompt(self) -> Step:
        return self.random(self.sample.prompt_length, Phase.PREFILL)

    def decode(self) -> Step:
        return self.random(1, Phase.DECODE)

    def _random(self, heads: int, q_len: int, scale: float = 1.0) -> Tensor:
        return torch.randn(1, heads, q_len, self.geometry.head_dim, generator=self.generator) * scale


def eager_probs(query: Tensor, keys: Tensor, scaling: float = SCALING) -> Tensor:
    """[B, H, q, m] causal attention in fp64, the q queries being the last q of the m keys' sequence."""
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    logits = (query.double() @ keys.double().transpose(-1, -2)) * scaling
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def window_scores(query: Tensor, keys: Tensor, window: int, scaling: float = SCALING) -> Tensor:
    """fp64 attention of the last `window` queries (prompt forward, causal) summed over rows, mean over each KV
    head's query heads: `[H_kv, n]`."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(groups, dim=1)
    n = keys.shape[2]
    logits = (query[:, :, -window:].double() @ keys.transpose(-1, -2)) * scaling
    causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(dim=-2)[0]
    return probs.reshape(keys.shape[1] // groups, groups, n).mean(dim=1)
