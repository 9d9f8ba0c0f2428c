"""k-means over keys (docs/methods.md#kmeans): the clustering, whole-cluster selection, sinks + window, budgets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import prompt_ids, tiny_model
from single_layer import SingleLayer, window_scores

from evalkv.errors import EvalkvError
from evalkv.kv.cluster import cluster_sums, spherical_kmeans
from evalkv.kv.engine import Engine
from evalkv.kv.view import Phase
from evalkv.methods import build_method

SINK, WINDOW = 4, 4


def _planted(labels: torch.Tensor | None = None, noise: float = 0.05, seed: int = 0):
    """Candidate keys along orthogonal directions, one per label; by default 4 clusters of 12 in rotating blocks of
    3 positions (evenly spaced starting points fall in every cluster). Returns keys `[1, 2, m, 8]` (both heads
    alike) and the labels `[m]`."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(48) // 3) % 4 if labels is None else labels
    keys = torch.eye(8)[labels] * 4 + noise * torch.randn(len(labels), 8, generator=generator)
    return keys.expand(1, 2, -1, -1).clone(), labels


def _prompt(middle_keys: torch.Tensor, seed: int = 1):
    """A prompt: SINK random keys, the given middle keys, WINDOW random keys; random values."""
    generator = torch.Generator().manual_seed(seed)
    edge = lambda count: torch.randn(1, 2, count, 8, generator=generator)  # noqa: E731
    keys = torch.cat([edge(SINK), middle_keys, edge(WINDOW)], dim=2)
    return keys, torch.randn(keys.shape, generator=generator)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_spherical_kmeans_is_deterministic_and_recovers_planted_clusters():
    keys, planted = _planted()
    points = keys[0] * torch.tensor([1.0, 3.0])[:, None, None]  # cosine k-means ignores scale
    labels, centroids = spherical_kmeans(points, 4, iterations=10)
    again, _ = spherical_kmeans(points.clone(), 4, iterations=10)
    assert torch.equal(labels, again)
    for head in range(2):
        assert _same_partition(labels[head], planted)
        for cluster in range(4):
            mean = F.normalize(F.normalize(points[head], dim=-1)[labels[head] == cluster].sum(0), dim=0)
            torch.testing.assert_close(centroids[head, cluster], mean)
    unit = F.normalize(points, dim=-1)
    assert torch.equal(labels, (unit @ centroids.transpose(1, 2)).argmax(-1))  # each point at its nearest centroid


def test_cluster_sums_add_each_cluster_in_position_order():
    labels = torch.tensor([[2, 0, 2, 2], [1, 1, 0, 1]])
    values = torch.tensor([[[1.0], [2.0], [3.0], [4.0]], [[5.0], [6.0], [7.0], [8.0]]])
    sums = cluster_sums(labels, values, 3)
    assert sums.dtype == torch.float32
    assert sums[..., 0].tolist() == [[2.0, 0.0, 8.0], [7.0, 19.0, 0.0]]


def test_spherical_kmeans_starts_at_evenly_spaced_points():
    points = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(0))
    _, centroids = spherical_kmeans(points, 4, iterations=0)
    torch.testing.assert_close(centroids[0], F.normalize(points[0, [0, 3, 6, 9]], dim=-1))


@pytest.mark.parametrize("scoring", ["window", "centroid"])
def test_kmeans_keeps_the_cluster_the_window_attends_to(scoring):
    middle, planted = _planted()
    keys, values = _prompt(middle)
    n = keys.shape[2]
    query = torch.zeros(1, 4, n, 8)
    query[..., 2] = 3.0  # every query looks along cluster 2's direction
    method = build_method("kmeans", {"budget": SINK + WINDOW + 12, "window_size": WINDOW, "n_sink": SINK,
                                     "num_clusters": 4, "scoring": scoring})
    layer = SingleLayer(method, n)
    layer.forward(keys, values, query, Phase.PREFILL)
    expected = torch.cat([torch.arange(SINK), SINK + torch.nonzero(planted == 2)[:, 0], torch.arange(n - WINDOW, n)])
    assert torch.equal(layer.cache.positions[0], expected.expand(2, -1))


def test_kmeans_keeps_whole_clusters_in_mass_order_and_one_partial_by_token_score():
    generator = torch.Generator().manual_seed(3)
    n, budget, cluster_size = 100, 40, 6
    keys, values = torch.randn(1, 2, n, 8, generator=generator), torch.randn(1, 2, n, 8, generator=generator)
    query = torch.randn(1, 4, n, 8, generator=generator) * 3
    method = build_method("kmeans", {"budget": budget, "window_size": WINDOW, "cluster_size": cluster_size})
    layer = SingleLayer(method, n)
    layer.forward(keys, values, query, Phase.PREFILL)

    middle = slice(SINK, n - WINDOW)
    count = math.ceil((n - SINK - WINDOW) / cluster_size)
    labels, _ = spherical_kmeans(keys[0, :, middle], count, iterations=10)
    scores = window_scores(query, keys, WINDOW)[:, middle]
    room = budget - SINK - WINDOW
    for head in range(2):
        kept = layer.cache.positions[0, head]
        assert kept.numel() == budget
        assert kept[:SINK].tolist() == list(range(SINK)) and kept[-WINDOW:].tolist() == list(range(n - WINDOW, n))
        chosen = set((kept[SINK:-WINDOW] - SINK).tolist())
        mass = {c: float(scores[head][labels[head] == c].sum()) for c in range(count)}
        expected: set[int] = set()
        for cluster in sorted(mass, key=lambda c: -mass[c]):
            members = torch.nonzero(labels[head] == cluster)[:, 0]
            best = members[scores[head][members].argsort(descending=True)][: room - len(expected)]
            expected |= set(best.tolist())
            if len(best) < len(members):
                break
        assert chosen == expected
        partial = [c for c in range(count) if 0 < sum(labels[head][i] == c for i in chosen) < (labels[head] == c).sum()]
        assert len(partial) <= 1


def _representatives(middle: torch.Tensor, planted: torch.Tensor) -> list[int]:
    unit = F.normalize(middle[0, 0], dim=-1)
    chosen = []
    for cluster in range(int(planted.max()) + 1):
        members = torch.nonzero(planted == cluster)[:, 0]
        centroid = F.normalize(unit[members].sum(0), dim=0)
        chosen.append(int(members[(unit[members] @ centroid).argmax()]))
    return chosen


def _kept_middle(options: dict, middle: torch.Tensor) -> list[int]:
    keys, values = _prompt(middle)
    n = keys.shape[2]
    layer = SingleLayer(build_method("kmeans", {"window_size": WINDOW, "num_clusters": 4, **options}), n)
    layer.forward(keys, values, torch.randn(1, 4, n, 8), Phase.PREFILL)
    kept = layer.cache.positions[0, 0].tolist()
    assert kept[:SINK] == list(range(SINK)) and kept[-WINDOW:] == list(range(n - WINDOW, n))
    return [position - SINK for position in kept[SINK:-WINDOW]]


def test_kmeans_representative_keeps_one_token_per_cluster_then_the_most_recent():
    middle, planted = _planted(noise=0.3)
    representatives = _representatives(middle, planted)
    recent = [i for i in reversed(range(len(planted))) if i not in representatives][:6]
    kept = _kept_middle({"budget": SINK + WINDOW + 4 + 6, "selection": "representative"}, middle)
    assert kept == sorted(representatives + recent)


def test_kmeans_representatives_of_the_largest_clusters_come_first():
    # sizes 3, 3, 6, 9; positions 0, 7, 13, 20 (the evenly spaced starts) lie in clusters 0, 1, 2, 3
    planted = torch.tensor([0, 0, 0, 3, 3, 3, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3])
    middle, _ = _planted(planted, noise=0.3)
    kept = _kept_middle({"budget": SINK + WINDOW + 2, "selection": "representative"}, middle)
    assert kept == sorted(_representatives(middle, planted)[2:])


def test_kmeans_on_a_model_holds_budget_sinks_and_window_and_is_deterministic(tokenizer):
    ids = prompt_ids(tokenizer)
    runs = [Engine(tiny_model(), build_method("kmeans", {"budget": 64, "window_size": 8})).generate(
        ids, 3, keep_session=True) for _ in range(2)]
    for layer, again in zip(runs[0].session.cache.layers, runs[1].session.cache.layers):
        assert torch.equal(layer.positions, again.positions)
        assert layer.length == 64 + 2  # prompt cut to the budget, generated tokens appended
        assert (layer.positions[0, :, :4] == torch.arange(4)).all()
        assert (layer.positions[0, :, 56:64] == torch.arange(len(ids) - 8, len(ids))).all()


def test_kmeans_reclusters_every_n_decode_steps(tokenizer):
    ids = prompt_ids(tokenizer)
    options = {"budget": 64, "window_size": 8, "cluster_every": 3, "scoring": "window"}
    generation = Engine(tiny_model(), build_method("kmeans", options)).generate(ids, 8, trace=True)
    seen = [generation.trace[step][0] for step in range(1, 8)]  # what decode steps 1..7 attended to
    assert [positions.shape[-1] for positions in seen] == [65, 66, 67, 65, 66, 67, 65]
    for step in (3, 6):  # cut back to the budget after these steps, the newest 8 tokens kept
        after = seen[step][0, 0]  # the next step's cache minus its new token
        assert after[:4].tolist() == [0, 1, 2, 3]
        newest = len(ids) + step - 1
        assert after[-9:-1].tolist() == list(range(newest - 7, newest + 1))


@pytest.mark.parametrize("options,message", [
    ({"budget": 30}, "smaller than n_sink"),
    ({"budget": 64, "scoring": "mass"}, "scoring must be one of"),
    ({"budget": 64, "selection": "attention"}, "selection must be one of"),
    ({"budget": 64, "cluster_every": 0}, "cluster_every"),
])
def test_kmeans_rejects_bad_options(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_method("kmeans", options)
