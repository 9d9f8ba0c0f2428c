"""Fused Triton kernels for the attention statistics of many query rows, without a `[rows x keys]` block in memory.

The scoring functions of `evalkv/kv/attention.py` dispatch here on CUDA (docs/performance.md#fused-scoring-kernels);
this module needs triton (it ships with PyTorch's CUDA wheels; `pip install evalkv[triton]` elsewhere) and runs on
the CPU through Triton's interpreter (`TRITON_INTERPRET=1` before it is imported), which the tests use.

Two passes, each recomputing `q . k` tile by tile as flash attention does:

1. `_row_statistics_kernel`: per query row and head, the log-sum-exp (base 2) of its visible logits, by an online
   max and sum over key tiles; a row's keys may be split over several programs (few rows, long caches), whose partial
   maxima and sums are merged afterwards. Optionally the number of keys each row sees.
2. per key tile, over the query tiles that may see it, every probability recomputed as `exp2(s - lse)`:
   `_column_sums_kernel` sums `A_ij^power` over the rows (H2O's accumulated attention with power 1, OBCache's V
   score with power p), `_last_reads_kernel` keeps, per key, the latest row whose probability averaged over a
   group of query heads exceeds `1 / (keys the row sees)` (LRU's access rule).

Masking is by true position (a key later than a row's query is invisible), so caches with holes after eviction are
exact; no order is assumed for correctness. Tiles that no key/row pair of can see are skipped: the loop bounds come
from per-tile minima and maxima of the positions (with keys in position order, as the cache keeps them, and queries
in order, the causal upper triangle is never computed), and pass 2 applies no mask to row tiles whose every query
is at or after every key of the key tile (below the causal edge, as flash attention's causal kernels leave the
off-diagonal blocks unmasked). The product `q . k` accumulates in fp32 (`ieee` for fp32
inputs, never TF32); the PyTorch path rounds the product to the model's dtype before its fp32 softmax, so on bf16
the two differ by that rounding. Under the interpreter, bf16 inputs are converted to fp32 first (exactly), since it
multiplies bf16 tiles as raw integers. A row that sees no key at all contributes nothing here (it never happens in
evalkv: every query sees its own key).

GQA: the column sums run one program per query head (the grid is over query heads, not KV heads): the program loads
its key tile once and streams the query tiles, so reading a KV head's key tile once per query head costs `G x n x d`
loads against the `n^2 / (2 x tile) x d` query loads of the pass, while the grid gets `G` times the programs (a 32K
prompt on 32 query heads: 256 key tiles x 32 heads = 8192 programs instead of 2048), which keeps every SM busy down
to short prompts. The last reads need the mean over a group of query heads before the threshold, so one program
holds a key tile for the whole group, and a key tile's rows are split over several programs when there are few.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from evalkv.kv.attention import LOG2E

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, at least 16 for `tl.dot`) and launch settings of the two passes."""

    rows: int = 128  # pass 1: query rows per program
    keys: int = 64  # pass 1: keys per step
    key_block: int = 128  # pass 2: keys per program (held for the whole pass)
    row_block: int = 64  # pass 2: query rows per step
    num_warps: int = 8
    num_stages: int = 3


def default_tiles(head_dim: int, dtype: torch.dtype) -> Tiles:
    """Tiles as Triton's flash-attention forward uses them for 16-bit inputs and head_dim <= 128; smaller for larger
    heads and for fp32 (twice the bytes per tile, multiplied without tensor cores)."""
    if head_dim <= 128 and dtype != torch.float32:
        return Tiles()
    return Tiles(rows=64, keys=32, key_block=64, row_block=32, num_warps=4, num_stages=2)


def supports(query: Tensor, keys: Tensor) -> bool:
    """Whether the kernels take these tensors: a float dtype triton multiplies, the same for both, head_dim <= 256."""
    return (query.dtype in DTYPES and keys.dtype == query.dtype and query.shape[-1] <= MAX_HEAD_DIM
            and query.device == keys.device)


@triton.jit
def _load_vectors(base, index, stride, length, stride_dim, head_dim, BLOCK_D: tl.constexpr):
    """The vectors `index` of a `[length, head_dim]` matrix at `base` as a `[len(index), BLOCK_D]` tile, zeros past
    either end."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(base + index[:, None].to(tl.int64) * stride + dims[None, :] * stride_dim,
                   mask=(index < length)[:, None] & (dims < head_dim)[None, :], other=0.0)


# Lengths and tile counts change with every prompt; compiling a variant per divisibility class of each is not worth it.
@triton.jit(do_not_specialize=["q_len", "kv_len", "num_row_tiles", "tiles_per_split"])
def _row_statistics_kernel(
    Q, K, QPOS, KPOS, MAX_OUT, SUM_OUT, COUNT_OUT, KEY_TILES,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sqp_b, sqp_m, skp_b, skp_h, skp_n,
    num_heads, kv_heads, groups, q_len, kv_len, head_dim, num_row_tiles, tiles_per_split, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COUNT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (row tile, key split, batch x head): the running max and sum of exp2 over its share of the key tiles
    that the row tile may see (KEY_TILES), base-2 logits; MAX/SUM/COUNT_OUT are `[splits, B * H, q]`."""
    row_tile = tl.program_id(0)
    split = tl.program_id(1)
    batch_head = tl.program_id(2)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // groups
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    query = _load_vectors(Q + batch.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h, rows, sq_m, q_len, sq_d,
                          head_dim, BLOCK_D)
    query_positions = tl.load(QPOS + batch.to(tl.int64) * sqp_b + rows * sqp_m, mask=row_ok, other=-1)
    k_base = K + batch.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h
    kp_base = KPOS + batch.to(tl.int64) * skp_b + kv_head.to(tl.int64) * skp_h
    visible_tiles = tl.load(KEY_TILES + (batch * kv_heads + kv_head) * num_row_tiles + row_tile)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, visible_tiles)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    count = tl.zeros([BLOCK_M], tl.int32)
    for tile in range(first, last):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_len
        key = _load_vectors(k_base, cols, sk_n, kv_len, sk_d, head_dim, BLOCK_D)
        key_positions = tl.load(kp_base + cols * skp_n, mask=col_ok, other=0)
        logits = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * scale_log2
        visible = col_ok[None, :] & (key_positions[None, :] <= query_positions[:, None])
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key seen yet: keep exp2(-inf) = 0, not NaN
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), axis=1)
        running_max = new_max
        if COUNT:
            count += tl.sum(visible.to(tl.int32), axis=1)
    out = (split * tl.num_programs(2) + batch_head).to(tl.int64) * q_len + rows
    tl.store(MAX_OUT + out, running_max, mask=row_ok)
    tl.store(SUM_OUT + out, running_sum, mask=row_ok)
    if COUNT:
        tl.store(COUNT_OUT + out, count, mask=row_ok)


@triton.jit(do_not_specialize=["q_len", "kv_len", "num_key_tiles"])
def _column_sums_kernel(
    Q, K, QPOS, KPOS, LSE, OUT, FIRST_ROW_TILE, FULL_ROW_TILE,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sqp_b, sqp_m, skp_b, skp_h, skp_n,
    num_heads, kv_heads, groups, q_len, kv_len, head_dim, num_key_tiles, scale_log2, power,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (key tile, batch x head): `sum_i A_ij^power` over the rows that may see the tile, into OUT
    `[B * H, m]`; `A_ij = exp2(s_ij - lse_i)` with LSE `[B * H, q]` from pass 1 (+inf for a row that sees nothing).
    Row tiles from FULL_ROW_TILE on see every key of the tile: no mask (as the causal flash-attention kernels skip it
    off the diagonal); rows past the end have lse = +inf and add 0, keys past the end are not stored."""
    key_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // groups
    cols = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < kv_len
    key = _load_vectors(K + batch.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h, cols, sk_n, kv_len, sk_d,
                        head_dim, BLOCK_D)
    key_positions = tl.load(KPOS + batch.to(tl.int64) * skp_b + kv_head.to(tl.int64) * skp_h + cols * skp_n,
                            mask=col_ok, other=0)
    q_base = Q + batch.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h
    lse_base = LSE + batch_head.to(tl.int64) * q_len
    tile_index = (batch * kv_heads + kv_head) * num_key_tiles + key_tile
    first = tl.load(FIRST_ROW_TILE + tile_index)
    full = tl.maximum(tl.load(FULL_ROW_TILE + tile_index), first)
    key_t = tl.trans(key)
    # A^power = 2^(power (s - lse)) = 2^(q.k * scale_log2 * power - lse * power)
    scale_power = scale_log2 * power
    # Summed element-wise across steps and over the rows once at the end: no cross-warp reduction per step.
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(first * BLOCK_M, full * BLOCK_M, BLOCK_M):  # tiles across the causal edge: masked
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        query = _load_vectors(q_base, rows, sq_m, q_len, sq_d, head_dim, BLOCK_D)
        query_positions = tl.load(QPOS + batch.to(tl.int64) * sqp_b + rows * sqp_m, mask=row_ok, other=-1)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * power
        exponent = tl.dot(query, key_t, input_precision=DOT_PRECISION) * scale_power - lse[:, None]
        visible = col_ok[None, :] & (key_positions[None, :] <= query_positions[:, None])
        total += tl.exp2(tl.where(visible, exponent, float("-inf")))  # masked before exp2: no overflow
    for start in range(full * BLOCK_M, q_len, BLOCK_M):  # tiles that see every key of this one
        rows = start + tl.arange(0, BLOCK_M)
        query = _load_vectors(q_base, rows, sq_m, q_len, sq_d, head_dim, BLOCK_D)
        lse = tl.load(lse_base + rows, mask=rows < q_len, other=float("inf")) * power
        total += tl.exp2(tl.dot(query, key_t, input_precision=DOT_PRECISION) * scale_power - lse[:, None])
    tl.store(OUT + batch_head.to(tl.int64) * kv_len + cols, tl.sum(total, axis=0), mask=col_ok)


@triton.jit
def _read_by_group(
    Q, K, QPOS, KPOS, LSE, VISIBLE, tile, cols, col_ok, batch, group, latest,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sqp_b, sqp_m, skp_b, skp_h, skp_n,
    num_heads, groups, group_heads, q_len, kv_len, head_dim, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One row tile of `_last_reads_kernel`: `latest` updated with the rows that read each key; MASKED: the tile
    may hold rows before some of the keys (else every row sees every key: no position mask)."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    query_positions = tl.load(QPOS + batch.to(tl.int64) * sqp_b + rows * sqp_m, mask=row_ok, other=-1)
    visible_count = tl.load(VISIBLE + batch.to(tl.int64) * q_len + rows, mask=row_ok, other=1)
    summed = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for member in range(0, group_heads):
        head = group * group_heads + member
        kv_head = head // groups
        key = _load_vectors(K + batch.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h, cols, sk_n, kv_len,
                            sk_d, head_dim, BLOCK_D)
        query = _load_vectors(Q + batch.to(tl.int64) * sq_b + head.to(tl.int64) * sq_h, rows, sq_m, q_len, sq_d,
                              head_dim, BLOCK_D)
        lse = tl.load(LSE + (batch * num_heads + head).to(tl.int64) * q_len + rows, mask=row_ok,
                      other=float("inf"))
        exponent = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * scale_log2 - lse[:, None]
        if MASKED:
            key_positions = tl.load(KPOS + batch.to(tl.int64) * skp_b + kv_head.to(tl.int64) * skp_h
                                    + cols * skp_n, mask=col_ok, other=0)
            exponent = tl.where(key_positions[None, :] <= query_positions[:, None], exponent, float("-inf"))
        summed += tl.exp2(exponent)
    uniform = 1.0 / visible_count.to(tl.float32)
    read = (summed / group_heads > uniform[:, None]) & row_ok[:, None] & col_ok[None, :]
    return tl.maximum(latest, tl.max(tl.where(read, query_positions[:, None], -1), axis=0))


@triton.jit(do_not_specialize=["q_len", "kv_len", "num_key_tiles", "num_row_tiles", "tiles_per_split"])
def _last_reads_kernel(
    Q, K, QPOS, KPOS, LSE, VISIBLE, OUT, FIRST_ROW_TILE, FULL_ROW_TILE,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sqp_b, sqp_m, skp_b, skp_h, skp_n,
    num_heads, groups, group_heads, num_groups, q_len, kv_len, head_dim, num_key_tiles, num_row_tiles,
    tiles_per_split, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (key tile, row split, batch x head group): per key, the latest query position among its share of the
    rows whose probability, averaged over the group's `group_heads` query heads, exceeds `1 / VISIBLE[row]`; -1 when
    none. OUT is `[splits, B * num_groups, m]` int64. Row tiles from FULL_ROW_TILE on see every key of the tile
    (for every head of the group): no position mask."""
    key_tile = tl.program_id(0)
    split = tl.program_id(1)
    batch_group = tl.program_id(2)
    batch = batch_group // num_groups
    group = batch_group % num_groups
    cols = key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < kv_len
    tile_index = (batch * num_groups + group) * num_key_tiles + key_tile
    first = tl.load(FIRST_ROW_TILE + tile_index)
    start_tile = first + split * tiles_per_split
    end_tile = tl.minimum(start_tile + tiles_per_split, num_row_tiles)
    full = tl.minimum(tl.maximum(tl.load(FULL_ROW_TILE + tile_index), start_tile), end_tile)
    latest = tl.full([BLOCK_N], -1, tl.int64)
    for tile in range(start_tile, full):
        latest = _read_by_group(
            Q, K, QPOS, KPOS, LSE, VISIBLE, tile, cols, col_ok, batch, group, latest,
            sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sqp_b, sqp_m, skp_b, skp_h, skp_n,
            num_heads, groups, group_heads, q_len, kv_len, head_dim, scale_log2,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, True)
    for tile in range(full, end_tile):
        latest = _read_by_group(
            Q, K, QPOS, KPOS, LSE, VISIBLE, tile, cols, col_ok, batch, group, latest,
            sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sqp_b, sqp_m, skp_b, skp_h, skp_n,
            num_heads, groups, group_heads, q_len, kv_len, head_dim, scale_log2,
            BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, False)
    out = (split * tl.num_programs(2) + batch_group).to(tl.int64) * kv_len
    tl.store(OUT + out + cols, latest, mask=col_ok)


def column_sums(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float, power: int = 1,
    tiles: Tiles | None = None, key_splits: int | None = None, lse: Tensor | None = None,
) -> Tensor:
    """`sum_i A_ij^power` over the query rows, per query head: `[B, H, m]` fp32 (attention.attention_column_sums).

    query `[B, H, q, d]`, query_positions `[B, q]`, keys `[B, H_kv, m, d]`, key_positions `[B, H_kv, m]`.
    `lse` `[B, H, q]`: the rows' base-2 log-sum-exps over these keys (from the model's attention), which replace
    pass 1. `tiles` and `key_splits` (programs per row tile in pass 1) override the defaults, for tests.
    """
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    tiles = tiles or default_tiles(head_dim, query.dtype)
    query, keys = _interpretable(query, keys)
    out = torch.empty(batch, num_heads, kv_len, dtype=torch.float32, device=query.device)
    with _on_device(query):
        if lse is None:
            lse, _ = _row_statistics(query, query_positions, keys, key_positions, scaling, tiles, False, key_splits)
        first, full = _row_tile_bounds(query_positions, key_positions, tiles.row_block, tiles.key_block)
        grid = (triton.cdiv(kv_len, tiles.key_block), batch * num_heads)
        _column_sums_kernel[grid](
            query, keys, query_positions, key_positions, lse, out, first, full,
            *query.stride(), *keys.stride(), *query_positions.stride(), *key_positions.stride(),
            num_heads, kv_heads, num_heads // kv_heads, q_len, kv_len, head_dim, grid[0], scaling * LOG2E,
            float(power), BLOCK_M=tiles.row_block, BLOCK_N=tiles.key_block, **_launch_options(query, tiles),
        )
    return out


def last_reads(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float, heads: int,
    tiles: Tiles | None = None, key_splits: int | None = None, row_splits: int | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """Per key, the latest query position whose attention, averaged over each of `heads` groups of consecutive query
    heads, exceeds `1 / (keys of KV head 0 the row sees)`; -1 where no row reads it: `[B, heads, m]` int64
    (attention.attention_last_reads, LRU's access rule). `row_splits`: programs per key tile (default: enough to
    fill the device); `lse` as in `column_sums`."""
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    tiles = tiles or default_tiles(head_dim, query.dtype)
    query, keys = _interpretable(query, keys)
    group_heads = num_heads // heads
    key_tiles = triton.cdiv(kv_len, tiles.key_block)
    row_tiles = triton.cdiv(q_len, tiles.row_block)
    with _on_device(query):
        if lse is None:
            lse, counts = _row_statistics(query, query_positions, keys, key_positions, scaling, tiles, True,
                                          key_splits)
            visible = counts[:, 0].contiguous()  # [B, q]: the uniform level is judged on KV head 0's keys, as lru.py
        else:  # the keys of KV head 0 not after each row's position (the cache keeps them in position order)
            visible = torch.searchsorted(key_positions[:, 0].contiguous(), query_positions.contiguous(),
                                         right=True).to(torch.int32)
        first, full = _row_tile_bounds(query_positions, key_positions, tiles.row_block, tiles.key_block)
        kv_of_head = torch.arange(num_heads, device=query.device) // (num_heads // kv_heads)
        first = first[:, kv_of_head].reshape(batch, heads, group_heads, key_tiles).amin(dim=2).contiguous()
        full = full[:, kv_of_head].reshape(batch, heads, group_heads, key_tiles).amax(dim=2).contiguous()
        wanted = row_splits or math.ceil(_target_programs(query.device) / (key_tiles * batch * heads))
        per_split = triton.cdiv(row_tiles, max(1, min(wanted, row_tiles)))
        splits = triton.cdiv(row_tiles, per_split)
        out = torch.empty(splits, batch * heads, kv_len, dtype=torch.int64, device=query.device)
        grid = (key_tiles, splits, batch * heads)
        _last_reads_kernel[grid](
            query, keys, query_positions, key_positions, lse, visible, out, first, full,
            *query.stride(), *keys.stride(), *query_positions.stride(), *key_positions.stride(),
            num_heads, num_heads // kv_heads, group_heads, heads, q_len, kv_len, head_dim, key_tiles, row_tiles,
            per_split, scaling * LOG2E, BLOCK_M=tiles.row_block, BLOCK_N=tiles.key_block,
            **_launch_options(query, tiles),
        )
    return out.amax(dim=0).reshape(batch, heads, kv_len)


def _row_statistics(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float, tiles: Tiles,
    count: bool, key_splits: int | None,
) -> tuple[Tensor, Tensor | None]:
    """Pass 1: each row's base-2 log-sum-exp of its visible logits `[B, H, q]` fp32 (+inf for a row that sees no key,
    so that its probabilities come out 0), and with `count` the number of keys it sees `[B, H, q]` int32."""
    batch, num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len = keys.shape[1], keys.shape[2]
    row_tiles = triton.cdiv(q_len, tiles.rows)
    key_tiles = triton.cdiv(kv_len, tiles.keys)
    # Key tiles a row tile may see: those before the last tile whose earliest key is not after the tile's latest query.
    latest_query = _tile_extreme(query_positions, tiles.rows, largest=True)  # [B, row tiles]
    earliest_key = _tile_extreme(key_positions, tiles.keys, largest=False)  # [B, H_kv, key tiles]
    suffix_earliest = earliest_key.flip(-1).cummin(dim=-1).values.flip(-1)
    visible_tiles = torch.searchsorted(
        suffix_earliest, latest_query[:, None].expand(batch, kv_heads, row_tiles).contiguous(), right=True
    ).to(torch.int32)
    # Few row tiles (a window of rows over a long cache): split each row's keys over programs, merged below.
    wanted = key_splits or math.ceil(_target_programs(query.device) / (row_tiles * batch * num_heads))
    per_split = triton.cdiv(key_tiles, max(1, min(wanted, key_tiles)))
    splits = triton.cdiv(key_tiles, per_split)
    shape = (splits, batch * num_heads, q_len)
    maxima = torch.empty(shape, dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxima)
    counts = torch.empty(shape if count else (1,), dtype=torch.int32, device=query.device)
    _row_statistics_kernel[(row_tiles, splits, batch * num_heads)](
        query, keys, query_positions, key_positions, maxima, sums, counts, visible_tiles,
        *query.stride(), *keys.stride(), *query_positions.stride(), *key_positions.stride(),
        num_heads, kv_heads, num_heads // kv_heads, q_len, kv_len, head_dim, row_tiles, per_split,
        scaling * LOG2E, BLOCK_M=tiles.rows, BLOCK_N=tiles.keys, COUNT=count, **_launch_options(query, tiles),
    )
    maximum = maxima.amax(dim=0)
    shift = torch.where(maximum == float("-inf"), 0.0, maximum)
    total = (sums * torch.exp2(maxima - shift)).sum(dim=0) if splits > 1 else sums[0]
    lse = torch.where(total > 0, shift + torch.log2(total), float("inf"))
    visible = counts.sum(dim=0, dtype=torch.int32).reshape(batch, num_heads, q_len) if count else None
    return lse.reshape(batch, num_heads, q_len), visible


def _row_tile_bounds(query_positions: Tensor, key_positions: Tensor, row_block: int,
                     key_block: int) -> tuple[Tensor, Tensor]:
    """Pass 2's row tiles per (batch, KV head, key tile), `[B, H_kv, key tiles]` int32 each: the first one that may
    see the key tile (every earlier row tile's queries all precede its earliest key), and the first from which
    every row tile sees all of its keys (each later tile's earliest query is not before its latest key)."""
    batch, kv_heads = key_positions.shape[:2]
    latest_so_far = _tile_extreme(query_positions, row_block, largest=True).cummax(dim=-1).values
    earliest_after = _tile_extreme(query_positions, row_block, largest=False).flip(-1).cummin(dim=-1).values.flip(-1)
    tiles = latest_so_far.shape[-1]
    first = torch.searchsorted(latest_so_far[:, None].expand(batch, kv_heads, tiles).contiguous(),
                               _tile_extreme(key_positions, key_block, largest=False))
    full = torch.searchsorted(earliest_after[:, None].expand(batch, kv_heads, tiles).contiguous(),
                              _tile_extreme(key_positions, key_block, largest=True))
    return first.to(torch.int32), full.to(torch.int32)


def _tile_extreme(positions: Tensor, block: int, largest: bool) -> Tensor:
    """The largest (or smallest) position of each tile of `block` entries along the last dimension."""
    info = torch.iinfo(positions.dtype)
    padding = -positions.shape[-1] % block
    padded = torch.cat([positions, positions.new_full((*positions.shape[:-1], padding),
                                                      info.min if largest else info.max)], dim=-1)
    tiled = padded.reshape(*positions.shape[:-1], -1, block)
    return tiled.amax(dim=-1) if largest else tiled.amin(dim=-1)


def _launch_options(query: Tensor, tiles: Tiles) -> dict:
    """What every kernel takes besides its tiles: the head-dim block (a power of two, at least 16 for `tl.dot`), fp32
    products never in TF32, warps and stages."""
    return dict(BLOCK_D=max(16, triton.next_power_of_2(query.shape[-1])),
                DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)


def _interpretable(query: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 inputs in fp32 under Triton's interpreter, which multiplies bf16 tiles as their raw 16-bit integers (the
    conversion is exact, and the products accumulate in fp32 either way)."""
    interpreted = not isinstance(_row_statistics_kernel, triton.runtime.JITFunction)
    if interpreted and query.dtype == torch.bfloat16:
        return query.float(), keys.float()
    return query, keys


def _on_device(tensor: Tensor):
    """Launch on the tensor's GPU (triton launches on the current device; a model spread over GPUs has layers on
    others)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: four per SM on CUDA; one on the CPU (the interpreter runs them in turn)."""
    return 4 * _multiprocessors(device.index or 0) if device.type == "cuda" else 1


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
