"""Undoing RoPE on cached keys, for scorers that want position-free keys (learned_mlp).

The cache holds keys after RoPE at their true positions. The model's rotary embedding gives `cos, sin` for any
positions (`evalkv.kv.adapter.rotary`: the table of the running forward, so for LongRoPE the short or long factors as
that forward chose them; keys whose factor set is unknown are refused there). RoPE maps
`k -> k * cos + rotate_half(k) * sin` (the half-split convention of Llama, Qwen2, Mistral, Qwen3, Phi-3), a rotation
scaled by `cos^2 + sin^2` (1 unless the rope type scales attention, as LongRoPE's attention factor does), so the
inverse is `(k * cos - rotate_half(k) * sin) / (cos^2 + sin^2)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# positions [B, m] -> (cos, sin), each [B, m, head_dim] fp32
RotaryTable = Callable[[Tensor], tuple[Tensor, Tensor]]


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def unrotate_keys(keys: Tensor, positions: Tensor, rotary: RotaryTable) -> Tensor:
    """Keys `[B, h, m, d]` rotated at `positions` `[B, h, m]` -> the keys before RoPE, fp32."""
    batch, heads, length, dim = keys.shape
    cos, sin = rotary(positions.reshape(batch, heads * length))
    if cos.shape[-1] != dim:
        raise ValueError(f"the rotary embedding covers {cos.shape[-1]} of {dim} key dimensions (partial RoPE is "
                         "not supported)")
    cos, sin = cos.reshape(batch, heads, length, dim), sin.reshape(batch, heads, length, dim)
    keys = keys.float()
    return (keys * cos - rotate_half(keys) * sin) / (cos * cos + sin * sin)
