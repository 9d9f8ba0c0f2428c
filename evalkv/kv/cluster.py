"""Deterministic spherical k-means over cached keys, run per head on the keys' device (docs/methods.md#kmeans).

No randomness: centroids start at evenly spaced points, assignment ties go to the lowest cluster index, and
per-cluster sums are one-hot matrix products computed in fixed blocks (no atomic scatter), so a rerun on the same
device gives the same clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from evalkv.kv.attention import _BLOCK_ELEMENTS


def _rows_per_block(groups: int, width: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, groups * width))


def cluster_sums(labels: Tensor, values: Tensor, num_clusters: int) -> Tensor:
    """Per-cluster sums of `values` `[G, m, f]` for `labels` `[G, m]` in `[0, k)`: fp32 `[G, k, f]`."""
    groups, length, width = values.shape
    sums = values.new_zeros(groups, num_clusters, width, dtype=torch.float32)
    step = _rows_per_block(groups, num_clusters)
    for start in range(0, length, step):
        rows = labels[:, start : start + step, None]
        one_hot = torch.zeros(groups, rows.shape[1], num_clusters, device=values.device).scatter_(-1, rows, 1.0)
        sums += one_hot.transpose(1, 2) @ values[:, start : start + step].float()
    return sums


def _assign(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the most similar centroid for each point (`argmax` returns the first maximum: lowest index)."""
    groups, length, _ = points.shape
    labels = torch.empty(groups, length, dtype=torch.long, device=points.device)
    step = _rows_per_block(groups, centroids.shape[1])
    for start in range(0, length, step):
        labels[:, start : start + step] = (points[:, start : start + step] @ centroids.transpose(1, 2)).argmax(-1)
    return labels


def spherical_kmeans(points: Tensor, num_clusters: int, iterations: int) -> tuple[Tensor, Tensor]:
    """Cluster `points` `[G, m, d]` by cosine similarity, each of the G groups on its own.

    Points are L2-normalised; the k = min(num_clusters, m) centroids start at the points of indices
    `round(linspace(0, m - 1, k))`; each iteration assigns every point to its most similar centroid and moves each
    centroid to the normalised sum of its points (a cluster left empty keeps its centroid). Returns the labels
    `[G, m]` (int64, in `[0, k)`) of the final assignment and the unit centroids `[G, k, d]` (fp32).
    """
    points = F.normalize(points.float(), dim=-1)
    length = points.shape[1]
    count = max(1, min(num_clusters, length))
    start = torch.linspace(0, length - 1, count, device=points.device).round().long()
    centroids = points[:, start]
    for _ in range(iterations):
        sums = cluster_sums(_assign(points, centroids), points, count)
        filled = sums.norm(dim=-1, keepdim=True) > 0
        centroids = torch.where(filled, F.normalize(sums, dim=-1), centroids)
    return _assign(points, centroids), centroids
