"""CateKV: consistent heads keep a static chunk selection, adaptive heads keep (almost) everything."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.registry import register

DEFAULT_SPARSE_BUDGET = 2048  # run_catekv.sh


@dataclass(frozen=True)
class ChunkGeometry:
    """CateKV's prompt layout (docs/methods.md#catekv): `[0, init) | middle chunks | recent + tail`."""

    length: int
    chunk_size: int
    init_tokens: int
    recent_tokens: int

    @property
    def chunks(self) -> int:
        return self.length // self.chunk_size - 32 // self.chunk_size

    @property
    def chunk_end(self) -> int:
        return self.chunks * self.chunk_size

    @property
    def middle_start(self) -> int:
        return self.init_tokens

    @property
    def middle_end(self) -> int:
        return self.chunk_end - self.recent_tokens

    @property
    def middle_chunks(self) -> int:
        return max(0, (self.middle_end - self.middle_start) // self.chunk_size)


def middle_attention(view: AttentionView, geometry: ChunkGeometry, last_q: int, kv_head: int) -> Tensor:
    """`[B, last_q, n_mid]`: the last prompt queries' softmax over the middle keys only, mean over the KV head's
    query heads (no mask: every middle key precedes those queries)."""
    groups = view.geometry.gqa_groups
    heads = slice(kv_head * groups, (kv_head + 1) * groups)
    query = view.query[:, heads, -last_q:]
    keys = view.keys[:, kv_head : kv_head + 1, geometry.middle_start : geometry.middle_end]
    logits = torch.matmul(query, keys.transpose(-1, -2)).float() * view.scaling
    return torch.softmax(logits, dim=-1).mean(dim=1)


def chunk_max(attention: Tensor, chunk_size: int) -> Tensor:
    """`[..., n_mid]` -> `[..., n_mid // chunk_size]`: the largest value in each chunk."""
    chunks = attention.shape[-1] // chunk_size
    return attention[..., : chunks * chunk_size].unflatten(-1, (chunks, chunk_size)).amax(dim=-1)


def read_headmask(path: Path) -> Tensor:
    """A headmask CSV (one row per layer, one 0/1 column per KV head; 1 = adaptive head) as a bool tensor."""
    try:
        with open(path, newline="") as handle:
            rows = [[int(float(cell)) for cell in row] for row in csv.reader(handle) if row]
    except (OSError, ValueError) as error:
        raise EvalkvError(f"catekv: cannot read the headmask {path} ({error}); make one with evalkv headmask") from None
    if not rows or any(len(row) != len(rows[0]) for row in rows) or any(v not in (0, 1) for r in rows for v in r):
        raise EvalkvError(f"catekv: {path} must hold rows of 0/1 values, one row per layer and one column per KV head")
    return torch.tensor(rows, dtype=torch.bool)


@register("catekv")
@dataclass
class CateKV(Method):
    """CateKV (consistent heads: static chunk selection; adaptive heads: full cache; prompt only).

    Based on "CateKV: On Sequential Consistency for Long-Context LLM Inference Acceleration", Jiang et al., ICML 2025
    (OpenReview u7dlwgKstN), reference code jhy-123/CateKV@762c158 (`CateKVCache`, `select_headmask/static.py`).

    After the prompt's attention in each layer: the prompt is cut into `[0, init_tokens)`, middle chunks of
    `chunk_size` tokens up to `chunk_end = (n // c - 32 // c) c` minus `recent_tokens`, and the tail from
    `chunk_end - recent_tokens`. The last `last_q` queries attend over the middle keys only (softmax over the middle,
    mean over each KV head's query heads); a chunk's score is the sum over those queries of its largest attention.
    Consistent heads (headmask 0) keep the init tokens, the best `budget / c - recent / c - init / c` chunks and the
    tail (`budget + n - chunk_end` tokens); adaptive heads (headmask 1) keep the init tokens, the best
    `int(middle_chunks * full_fraction)` chunks and the tail (everything at `full_fraction=1`). Heads keep different
    numbers of entries and the cache stores them per head; decoding appends to every head.

    `budget` is the reference's `sparse_budget` (2048 when none is given). The headmask comes from `evalkv headmask`
    (docs/methods.md#catekv) or the reference's `head_type_p*.csv` files (rows = layers, columns = KV heads).

    Deviations: the softmax runs in fp32 (the reference keeps the model dtype); the reference compresses only
    prompts over 4096 tokens, evalkv whenever the middle holds more chunks than the smaller of what consistent and
    adaptive heads keep and the prompt has at least `last_q` tokens; ties rank by the earlier chunk.
    """

    chunk_size: int = 8
    init_tokens: int = 64
    recent_tokens: int = 256
    last_q: int = 64
    full_fraction: float = 1.0
    headmask_path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.budget is None and self.compression_ratio is None:
            self.budget = DEFAULT_SPARSE_BUDGET
        super().__post_init__()
        c = self.chunk_size
        if c < 1 or self.init_tokens % c or self.recent_tokens % c:
            raise EvalkvError(f"catekv: init_tokens and recent_tokens must be multiples of chunk_size {c}")
        if self.budget is not None and self.budget < self.init_tokens + self.recent_tokens + c:
            raise EvalkvError(f"catekv: budget must leave room for a chunk beyond init_tokens + recent_tokens "
                              f"({self.init_tokens + self.recent_tokens}), got {self.budget}")
        if not 0.0 <= self.full_fraction <= 1.0 or self.last_q < 1:
            raise EvalkvError("catekv: full_fraction must be in [0, 1] and last_q >= 1")
        self._headmask: Tensor | None = None

    def headmask(self, num_layers: int, num_kv_heads: int) -> Tensor:
        if self._headmask is None:
            if not self.headmask_path:
                raise EvalkvError("catekv needs method.headmask_path=<a CSV made by evalkv headmask> (1 = adaptive)")
            self._headmask = read_headmask(Path(self.headmask_path))
        if tuple(self._headmask.shape) != (num_layers, num_kv_heads):
            raise EvalkvError(f"catekv: the headmask is {tuple(self._headmask.shape)} (layers x KV heads) but the "
                              f"model has {num_layers} layers and {num_kv_heads} KV heads")
        return self._headmask

    def compress_prompt(self, view: AttentionView) -> list[Tensor] | None:
        geometry = ChunkGeometry(view.length, self.chunk_size, self.init_tokens, self.recent_tokens)
        consistent_chunks = (self.capacity(view.length) - self.init_tokens - self.recent_tokens) // self.chunk_size
        adaptive = self.headmask(view.geometry.num_layers, view.geometry.num_kv_heads)[view.layer_idx]
        adaptive_chunks = int(geometry.middle_chunks * self.full_fraction)
        if geometry.middle_chunks <= min(consistent_chunks, adaptive_chunks) or view.num_new < self.last_q:
            return None
        if view.keys.shape[0] != 1 or view.cache.num_heads != view.geometry.num_kv_heads:
            raise EvalkvError("catekv keeps a different number of tokens per head and needs batch size 1")
        device = view.keys.device
        head = torch.arange(geometry.middle_start, device=device)
        tail = torch.arange(geometry.middle_end, view.length, device=device)
        offsets = torch.arange(self.chunk_size, device=device)
        kept = []
        for kv_head in range(view.geometry.num_kv_heads):
            scores = chunk_max(middle_attention(view, geometry, self.last_q, kv_head), self.chunk_size).sum(dim=1)
            count = adaptive_chunks if adaptive[kv_head] else consistent_chunks
            chunks = top_k_positions(scores[:, None, :], count)[0, 0]
            middle = (geometry.middle_start + chunks[:, None] * self.chunk_size + offsets).flatten()
            kept.append(torch.cat([head, middle, tail]))
        return kept
