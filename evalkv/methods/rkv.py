"""R-KV: importance from the newest queries' attention, minus redundancy among keys, held to the budget while a
long chain of thought is generated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import pool_scores
from evalkv.methods.base import AttentionView
from evalkv.methods.registry import register
from evalkv.methods.scorer import Scorer

_SIMILARITY_BLOCK = 1 << 24  # fp32 elements of one block of key similarities


def redundancy_scores(keys: Tensor, threshold: float) -> Tensor:
    """R-KV's redundancy of every entry `[B, h, m]` from keys `[B, h, m, d]` (the reference's `cal_similarity`).

    With `C_ij` the cosine similarity of keys i and j (0 on the diagonal), each row i drops `C_ij` at its last
    j with `C_ij > threshold`, or at j = 0 when there is none (the reference's `retain_direction="last"`: the
    newest near-duplicate of a token does not count against it); entry j's redundancy is then the softmax over j of
    the column mean `(1/m) sum_i C_ij`. Rows are taken in blocks: the `m x m` matrix is never held."""
    keys = keys.float()
    batch, heads, length, _ = keys.shape
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    column_sums = torch.zeros(batch, heads, length, dtype=torch.float32, device=keys.device)
    columns = torch.arange(length, device=keys.device)
    rows_per_block = max(1, _SIMILARITY_BLOCK // max(1, batch * heads * length))
    for start in range(0, length, rows_per_block):
        rows = columns[start : start + rows_per_block]
        similarity = unit[:, :, rows] @ unit.transpose(-1, -2)  # [B, h, r, m]
        similarity[..., torch.arange(rows.numel(), device=keys.device), rows] = 0.0
        last_similar = torch.where(similarity > threshold, columns, 0).amax(dim=-1, keepdim=True)
        similarity.scatter_(-1, last_similar, 0.0)
        column_sums += similarity.sum(dim=-2)
    return torch.softmax(column_sums / length, dim=-1)


@register("rkv")
@dataclass
class RKV(Scorer):
    """R-KV (redundancy-aware compression while decoding: attention importance minus key redundancy).

    Based on "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models", Cai et al. (arXiv 2505.24133),
    reference code Zefan-Cai/R-KV@d15c976 (`R1KV.update_kv` in `rkv/compression/r1_kv.py`, `cal_similarity` and
    `compute_attention_scores` in `rkv/utils.py`, the step trigger in `CausalLM_forward`, `rkv/modeling.py`);
    docs/methods.md#rkv.

    After the prompt's attention, and every `decode_interval` decode steps, a layer holding more than `budget`
    entries scores each entry before the last `window_size` (the observation window) per KV head:
    importance = max-pooled (kernel `kernel_size`) mean over the last `window_size` queries of their attention, the
    logits first reduced by the maximum over the KV head's query heads and the softmax taken over the scored entries
    only; redundancy = `redundancy_scores` of the layer's keys (every entry); score = `mix_lambda * importance -
    (1 - mix_lambda) * redundancy`. The window and the `budget - window_size` best entries stay, so the cache grows
    from `budget` to `budget + decode_interval - 1` between cuts (the reference's 128-token buffer).

    Deviations: cuts come every `decode_interval` forwards after the prompt; the reference cuts when the running
    token count (prompt included, and never reset between samples) is a multiple of `divide_length`. The observation
    rows are the queries since the last cut (`decode_buffer`, at least `window_size` of them); the reference keeps
    the last `window_size` queries across cuts, the same rows whenever `decode_interval >= window_size`. fp32 scores
    (the reference casts the attention to the model's dtype before pooling); each batch row scores its own keys
    (the reference reads the first row's similarities); ties by position. Not provided: `retain_direction="first"`
    (in the reference it always drops column 0) and the `divide_method="newline"` trigger.

    window_size: observation window alpha (the paper and README: 8).   kernel_size: max-pooling kernel (7).
    mix_lambda: importance weight lambda (the paper and README: 0.1; run_math.py's default 0.07).
    similarity_threshold: cosine similarity above which a key is a near-duplicate (`cal_similarity`: 0.5).
    decode_interval: steps between cuts (`divide_length`: 128).   decode_buffer: queries kept for a cut (8).
    """

    window_size: int = 8
    kernel_size: int = 7
    mix_lambda: float = 0.1
    similarity_threshold: float = 0.5
    decode_interval: Optional[int] = 128
    decode_buffer: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise EvalkvError(f"{self.name}: window_size must be >= 1 and kernel_size odd, got {self.window_size}, "
                              f"{self.kernel_size}")
        if self.budget is not None and self.budget <= self.window_size:
            raise EvalkvError(f"{self.name}: budget {self.budget} must exceed window_size {self.window_size}")
        if self.decode_interval is not None and self.decode_interval > 1 and self.decode_buffer < self.window_size:
            raise EvalkvError(f"{self.name}: decode_buffer {self.decode_buffer} keeps fewer queries than window_size "
                              f"{self.window_size} observes; raise it")

    def window(self) -> int:
        return self.window_size

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        window = view.length - candidates
        rows, row_positions = view.query[:, :, -window:], view.query_positions[:, -window:]
        keys = view.keys[..., :candidates, :]
        batch, num_heads, _, dim = rows.shape
        cache_heads = keys.shape[1]
        grouped = rows.reshape(batch, cache_heads, num_heads // cache_heads * window, dim)
        logits = (grouped @ keys.transpose(-1, -2)).float() * view.scaling
        logits = logits.reshape(batch, cache_heads, num_heads // cache_heads, window, candidates).amax(dim=2)
        later = view.positions[..., None, :candidates] > row_positions[:, None, :, None]
        logits = logits.masked_fill(later, torch.finfo(torch.float32).min)  # no-op unless rows precede candidates
        importance = pool_scores(torch.softmax(logits, dim=-1).mean(dim=-2), self.kernel_size, "max")
        redundancy = redundancy_scores(view.keys, self.similarity_threshold)[..., :candidates]
        return self.mix_lambda * importance - (1 - self.mix_lambda) * redundancy

