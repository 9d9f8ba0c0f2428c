"""A fused Triton kernel for k-means' assignment step: each point's most similar centroid, without a `[points x
centroids]` similarity matrix in memory (docs/methods.md#kmeans, docs/performance.md#fused-scoring-kernels).

`evalkv/kv/cluster.py` dispatches here on CUDA for 16-bit keys (as a model caches them); its block-wise fp32 matmul
stays the CPU path and the reference of `tests/test_cluster_kernels.py`, which runs this kernel on the CPU through
Triton's interpreter.

One program holds a tile of points for the whole pass and streams the centroids tile by tile: the similarities of
the tile accumulate in fp32 on the tensor cores, and only each point's running maximum and its index stay. The
similarity of a point `p` to a unit centroid `c` is `p . c`, not the cosine: dividing by `|p|` does not change which
centroid is largest, so the points are read as cached (exact in their 16-bit dtype), never normalised. The fp32
centroid is split into two parts of the points' dtype, `hi = c` rounded and `lo = c - hi` rounded, and
`p . hi + p . lo` summed in fp32: the products of two 16-bit numbers are exact in fp32, and each element of
`c - hi - lo` is within 2^-18 of that of `c` for bf16 (2^-22 for fp16), so a similarity differs from the fp32
product of the reference path by about that relative amount plus fp32 accumulation; only near-ties within it may
assign differently. Ties go to the lowest centroid index, as `torch.argmax` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from evalkv.kv.scoring_kernels import MAX_HEAD_DIM, _on_device

DTYPES = (torch.float16, torch.bfloat16)
POINTS_BLOCK = 128  # points per program, held for the whole pass
CENTROIDS_BLOCK = 64  # centroids per step


def supports(points: Tensor) -> bool:
    """Whether the kernel takes these points: 16-bit (as a model caches keys), head_dim <= 256."""
    return points.dtype in DTYPES and points.shape[-1] <= MAX_HEAD_DIM


@triton.jit
def _nearest_centroid_kernel(
    points, high, low, labels, length, count, head_dim,
    stride_pg, stride_pm, stride_pd, stride_cg, stride_ck, stride_cd, stride_lg,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    group, tile = tl.program_id(1), tl.program_id(0)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    point = tl.load(points + group * stride_pg + rows[:, None] * stride_pm + dims[None, :] * stride_pd,
                    mask=(rows[:, None] < length) & (dims[None, :] < head_dim), other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_M], tl.int64)
    for start in range(0, count, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        offsets = group * stride_cg + columns[None, :] * stride_ck + dims[:, None] * stride_cd
        inside = (columns[None, :] < count) & (dims[:, None] < head_dim)
        similarity = tl.dot(point, tl.load(high + offsets, mask=inside, other=0.0), input_precision=DOT_PRECISION)
        similarity += tl.dot(point, tl.load(low + offsets, mask=inside, other=0.0), input_precision=DOT_PRECISION)
        similarity = tl.where(columns[None, :] < count, similarity, float("-inf"))
        tile_best, tile_index = tl.max(similarity, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strictly: an equal maximum in a later tile keeps the lower index
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, start + tile_index.to(tl.int64), best_index)
    tl.store(labels + group * stride_lg + rows, best_index, mask=rows < length)


def nearest_centroids(points: Tensor, centroids: Tensor) -> Tensor:
    """For points `[G, m, d]` (fp16 / bf16) and unit centroids `[G, k, d]` (fp32): each point's most similar centroid
    `[G, m]` (int64; ties to the lowest index)."""
    groups, length, head_dim = points.shape
    high = centroids.to(points.dtype)
    low = (centroids - high.float()).to(points.dtype)
    interpreted = not isinstance(_nearest_centroid_kernel, triton.runtime.JITFunction)
    if interpreted:  # the interpreter multiplies 16-bit tiles as raw integers; fp32 holds them exactly
        points, high, low = points.float(), high.float(), low.float()
    high, low = high.contiguous(), low.contiguous()
    labels = torch.empty(groups, length, dtype=torch.long, device=points.device)
    grid = (triton.cdiv(length, POINTS_BLOCK), groups)
    with _on_device(points):
        _nearest_centroid_kernel[grid](
            points, high, low, labels, length, centroids.shape[1], head_dim,
            *points.stride(), *high.stride(), labels.stride(0),
            BLOCK_M=POINTS_BLOCK, BLOCK_K=CENTROIDS_BLOCK, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            DOT_PRECISION="ieee" if points.dtype == torch.float32 else "tf32", num_warps=8, num_stages=3,
        )
    return labels
