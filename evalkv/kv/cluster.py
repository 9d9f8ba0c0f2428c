"""Deterministic spherical k-means over cached keys, run per head on the keys' device (docs/methods.md#kmeans).

No randomness: centroids start at evenly spaced points, assignment ties go to the lowest cluster index, and
per-cluster sums add each cluster's points in position order (a stable sort by cluster, then a segmented sum; no
atomic scatter), so a rerun on the same device gives the same clusters. On CUDA, 16-bit keys are assigned by a
fused Triton kernel (`evalkv.kv.cluster_kernels`: no similarity matrix in memory, the products on tensor cores);
elsewhere by fp32 matrix products in blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evalkv.kv.attention import _BLOCK_ELEMENTS, kernels_serve


def _rows_per_block(groups: int, width: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, groups * width))


def cluster_sums(labels: Tensor, values: Tensor, num_clusters: int) -> Tensor:
    """Per-cluster sums of `values` `[G, m, f]` for `labels` `[G, m]` in `[0, k)`: fp32 `[G, k, f]`, each cluster's
    values added in position order (an empty cluster sums to 0)."""
    groups, length, width = values.shape
    flat = (labels + torch.arange(groups, device=labels.device)[:, None] * num_clusters).flatten()
    order = flat.argsort(stable=True)
    sizes = torch.bincount(flat, minlength=groups * num_clusters)
    sums = torch.segment_reduce(values.float().flatten(0, 1)[order], "sum", lengths=sizes, axis=0)
    return sums.reshape(groups, num_clusters, width)


def _assign(points: Tensor, units: Tensor, centroids: Tensor) -> Tensor:
    """Index of the most similar centroid for each point (ties: the lowest index): through the fused kernel for
    16-bit `points` (the keys as cached) on CUDA, else over their fp32 `units` in blocks (`argmax` returns the first
    maximum)."""
    if kernels_serve(points):
        from evalkv.kv import cluster_kernels

        if cluster_kernels.supports(points):
            return cluster_kernels.nearest_centroids(points, centroids)
    groups, length, _ = units.shape
    labels = torch.empty(groups, length, dtype=torch.long, device=units.device)
    step = _rows_per_block(groups, centroids.shape[1])
    for start in range(0, length, step):
        labels[:, start : start + step] = (units[:, start : start + step] @ centroids.transpose(1, 2)).argmax(-1)
    return labels


def spherical_kmeans(points: Tensor, num_clusters: int, iterations: int) -> tuple[Tensor, Tensor]:
    """Cluster `points` `[G, m, d]` by cosine similarity, each of the G groups on its own.

    Points are L2-normalised; the k = min(num_clusters, m) centroids start at the points of indices
    `round(linspace(0, m - 1, k))`; each iteration assigns every point to its most similar centroid and moves each
    centroid to the normalised sum of its points (a cluster left empty keeps its centroid). Returns the labels
    `[G, m]` (int64, in `[0, k)`) of the final assignment and the unit centroids `[G, k, d]` (fp32).
    """
    units = F.normalize(points.float(), dim=-1)
    length = units.shape[1]
    count = max(1, min(num_clusters, length))
    start = torch.linspace(0, length - 1, count, device=units.device).round().long()
    centroids = units[:, start]
    for _ in range(iterations):
        sums = cluster_sums(_assign(points, units, centroids), units, count)
        filled = sums.norm(dim=-1, keepdim=True) > 0
        centroids = torch.where(filled, F.normalize(sums, dim=-1), centroids)
    return _assign(points, units, centroids), centroids
