"""One attention layer driven with random tensors, calling a method's hooks exactly as `Session.attention` does, so
method tests can compare the kept entries with brute-force computations on known queries, keys and values."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.kv.attention import attend
from evalkv.kv.cache import LayerCache
from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState

GEOMETRY = ModelGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)


@dataclass
class Step:
    query: Tensor  # [1, H, q, d]
    keys: Tensor  # the cache the attention saw (after before_attention), [1, H_c, m, d]
    values: Tensor
    positions: Tensor  # [1, H_c, m]
    output: Tensor  # [1, H, q, d]
    appended_keys: Tensor  # the cache the hooks started from (new entries appended), [1, H_c, m', d]
    appended_positions: Tensor


class SyntheticLayer:
    def __init__(self, method, prompt_length: int, geometry: ModelGeometry = GEOMETRY, seed: int = 0,
                 input_ids: Tensor | None = None, query_scale: float = 3.0):
        self.method = method
        self.geometry = geometry
        self.scaling = geometry.head_dim ** -0.5
        self.query_scale = query_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.cache = LayerCache()
        self.state: dict = {}
        ids = torch.zeros(1, prompt_length, dtype=torch.long) if input_ids is None else input_ids
        self.sample = SampleState(input_ids=ids, prompt_length=prompt_length)
        self.next_position = 0

    def _random(self, heads: int, q_len: int, scale: float = 1.0) -> Tensor:
        return torch.randn(1, heads, q_len, self.geometry.head_dim, generator=self.generator) * scale

    def forward(self, q_len: int, phase: Phase) -> Step:
        keys, values = self._random(self.geometry.num_kv_heads, q_len), self._random(self.geometry.num_kv_heads, q_len)
        query = self._random(self.geometry.num_heads, q_len, self.query_scale)
        positions = torch.arange(self.next_position, self.next_position + q_len)[None, :]
        self.next_position += q_len
        self.sample.phase = phase
        if phase is Phase.DECODE:
            self.sample.decode_step += 1
        self.cache.append(keys, values, positions)
        appended = (self.cache.keys.clone(), self.cache.positions.clone())
        view = AttentionView(0, self.geometry, self.sample, query, positions, self.scaling, self.cache, self.state)
        keep = self.method.before_attention(view)
        if keep is not None:
            self.cache.keep(keep)
        output = attend(query, self.cache.keys, self.cache.values, self.scaling, "eager")
        step = Step(query, self.cache.keys.clone(), self.cache.values.clone(), self.cache.positions.clone(), output,
                    *appended)
        view.output = output
        keep = self.method.after_attention(view)
        if keep is not None:
            self.cache.keep(keep)
        return step

    def prompt(self) -> Step:
        return self.forward(self.sample.prompt_length, Phase.PREFILL)

    def decode(self) -> Step:
        return self.forward(1, Phase.DECODE)


def eager_probs(query: Tensor, keys: Tensor, scaling: float) -> Tensor:
    """[B, H, q, m] causal attention in fp64, the q queries being the last q of the m keys' sequence."""
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    logits = (query.double() @ keys.double().transpose(-1, -2)) * scaling
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
