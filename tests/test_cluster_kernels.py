"""k-means' fused assignment kernel (evalkv/kv/cluster_kernels.py) against the fp32 block-wise path it replaces.

Without a GPU the kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, set by tests/conftest.py before triton is
imported); with one, compiled on CUDA. Skipped where triton is not installed (`pip install evalkv[triton]`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_kernels

from evalkv.kv import attention, cluster

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kernels():
    return triton_kernels("cluster_kernels")


def _reference(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The fp32 path: unit points times the centroids, the first maximum."""
    return (F.normalize(points.double(), dim=-1) @ centroids.double().transpose(1, 2)).argmax(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length, count, head_dim", [(300, 70, 8), (129, 200, 24), (5, 3, 128)])
def test_kernel_assigns_each_point_to_the_centroid_of_largest_similarity(kernels, device, dtype, length, count,
                                                                         head_dim):
    """Ragged tiles on both axes (128 points and 64 centroids per tile), head sizes under and at the padded block;
    where the kernel and fp64 differ, the two similarities must be within the kernel's rounding (a near-tie)."""
    generator = torch.Generator().manual_seed(length + count)
    points = (3 * torch.randn(2, length, head_dim, generator=generator)).to(device, dtype)
    centroids = F.normalize(torch.randn(2, count, head_dim, generator=generator), dim=-1).to(device)
    labels = kernels.nearest_centroids(points, centroids)
    assert labels.dtype == torch.long and labels.shape == (2, length)
    expected = _reference(points, centroids)
    similarity = F.normalize(points.double(), dim=-1) @ centroids.double().transpose(1, 2)
    gap = similarity.gather(-1, expected[..., None]) - similarity.gather(-1, labels[..., None])
    assert (gap <= 1e-5).all()
    assert (labels == expected).float().mean() > 0.99


def test_kernel_breaks_ties_to_the_lowest_index_across_tiles(kernels, device):
    """The same centroid at indices 3, 70 and 130 (three tiles of 64): every point it wins goes to 3."""
    generator = torch.Generator().manual_seed(0)
    centroids = F.normalize(torch.randn(1, 140, 16, generator=generator), dim=-1)
    centroids[0, [70, 130]] = centroids[0, 3].clone()
    points = (centroids[:, [3] * 50 + [10] * 50] * 2 + 0.01 * torch.randn(1, 100, 16, generator=generator))
    labels = kernels.nearest_centroids(points.to(device, torch.bfloat16), centroids.to(device))
    assert labels[0, :50].tolist() == [3] * 50 and labels[0, 50:].tolist() == [10] * 50


def test_kmeans_through_the_kernel_finds_the_clusters_of_the_fp32_path(kernels, device, monkeypatch):
    """spherical_kmeans with the kernel's assignments (bf16 keys, as cached) against the fp32 path on the same keys:
    planted clusters with noise, ten iterations, the same labels and centroids."""
    generator = torch.Generator().manual_seed(1)
    planted = torch.randint(0, 12, (2, 400), generator=generator)
    directions = F.normalize(torch.randn(2, 12, 32, generator=generator), dim=-1)
    keys = (directions.gather(1, planted[..., None].expand(-1, -1, 32)) * 5
            + 0.3 * torch.randn(2, 400, 32, generator=generator)).to(device, torch.bfloat16)
    monkeypatch.setenv(attention.KERNELS_ENV, "0")
    expected, expected_centroids = cluster.spherical_kmeans(keys, 12, iterations=10)
    monkeypatch.delenv(attention.KERNELS_ENV)
    served = []
    monkeypatch.setattr(cluster, "kernels_serve", lambda tensor: served.append(tensor.dtype) or True)
    labels, centroids = cluster.spherical_kmeans(keys, 12, iterations=10)
    assert served == [torch.bfloat16] * 11  # ten iterations and the final assignment went through the kernel
    assert torch.equal(labels, expected)
    torch.testing.assert_close(centroids, expected_centroids)

