"""The shrinking cache's bookkeeping: dense and ragged (per-head) layers."""

from __future__ import annotations

import pytest
import torch

from evalkv.kv.cache import KVCache, LayerCache


def _layer(heads: int = 2, length: int = 10) -> LayerCache:
    layer = LayerCache()
    keys = torch.arange(heads * length * 4, dtype=torch.float32).reshape(1, heads, length, 4)
    layer.append(keys, -keys, torch.arange(length)[None, :])
    return layer


def test_keep_gathers_entries_positions_and_state():
    layer = _layer()
    layer.extras["score"] = torch.arange(20.0).reshape(1, 2, 10)
    layer.keep(torch.tensor([[[1, 4], [0, 9]]]))
    assert layer.positions.tolist() == [[[1, 4], [0, 9]]]
    assert layer.extras["score"].tolist() == [[[1.0, 4.0], [10.0, 19.0]]]
    assert torch.equal(layer.values, -layer.keys)


def test_stacking_rows_of_different_lengths_pads_the_shorter_with_free_slots():
    """Rows of a slot cache merged below its capacity: the shorter row's keys, values and method state are padded at
    the end with zeros at position -1; each row still counts its own entries."""
    short, long = _layer(length=3), _layer(length=5)
    short.extras["score"], long.extras["score"] = torch.ones(1, 2, 3), torch.full((1, 2, 5), 2.0)
    merged = LayerCache()
    merged.stack_rows([short, long])
    assert merged.padded and merged.length == 5
    assert merged.positions[0].tolist() == [[0, 1, 2, -1, -1]] * 2
    assert merged.positions[1].tolist() == [list(range(5))] * 2
    assert merged.extras["score"][0].tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] * 2
    assert not merged.keys[0, :, 3:].any() and not merged.values[0, :, 3:].any()
    assert (merged.entries_of(0), merged.entries_of(1)) == (6, 10)


def test_stacking_rows_of_equal_lengths_pads_nothing():
    merged = LayerCache()
    merged.stack_rows([_layer(), _layer()])
    assert not merged.padded and merged.keys.shape == (2, 2, 10, 4)


def test_query_head_selection_expands_the_cache():
    layer = _layer()
    layer.keep(torch.tensor([[[0], [1], [2], [3]]]))
    assert layer.num_heads == 4 and layer.positions.flatten().tolist() == [0, 1, 2, 3]
    assert torch.equal(layer.keys[0, 1, 0], _layer().keys[0, 0, 1])  # query head 1 reads KV head 0


def test_query_head_selection_equals_expanding_then_gathering():
    """Per-query-head indices on a KV-head cache (batch 2, shared index batch): the same entries as giving every
    query head its own copy first, which the cache no longer does."""
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 12, 4, generator=generator), torch.randn(2, 2, 12, 4, generator=generator)
    indices = torch.sort(torch.rand(1, 6, 12, generator=generator).argsort(dim=-1)[..., :5], dim=-1).values
    layer, expected = LayerCache(), LayerCache()
    for cache in (layer, expected):
        cache.append(keys, values, torch.arange(3, 15).expand(2, 12))
        cache.extras["score"] = torch.arange(48.0).reshape(2, 2, 12)  # per KV head: goes with its entries
        cache.extras["rank"] = torch.arange(144.0).reshape(2, 6, 12)  # already per query head
    expected.expand_heads(6)
    expected.keep(indices)
    layer.keep(indices)
    assert layer.num_heads == 6 and layer.length == 5
    for name in ("keys", "values", "positions"):
        assert torch.equal(getattr(layer, name), getattr(expected, name))
    for name in ("score", "rank"):
        assert torch.equal(layer.extras[name], expected.extras[name])
    with pytest.raises(ValueError, match="does not match"):
        mismatched = _layer(heads=2)
        mismatched.extras["score"] = torch.zeros(1, 1, 10)
        mismatched.keep(torch.zeros(1, 4, 1, dtype=torch.long))
    assert torch.equal(layer.keys[1, 4], keys[1, 1, indices[0, 4]])  # query head 4 reads KV head 1
    with pytest.raises(ValueError, match="multiple"):
        _layer(heads=2).keep(torch.zeros(1, 3, 1, dtype=torch.long))


def test_ragged_layer_frees_memory_head_by_head_and_appends():
    layer = _layer()
    dense_bytes = layer.nbytes
    layer.keep_per_head([torch.tensor([0, 5, 9]), torch.tensor([2])])
    assert layer.is_ragged and layer.entries == 4 and layer.length == 3
    assert layer.nbytes == dense_bytes * 4 // 20
    assert [h.positions.flatten().tolist() for h in layer.heads] == [[0, 5, 9], [2]]
    layer.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), torch.tensor([[10]]))
    assert [h.positions.flatten().tolist() for h in layer.heads] == [[0, 5, 9, 10], [2, 10]]
    layer.keep(torch.tensor([[[0]]]))  # a shared keep on a ragged layer applies per head
    assert [h.positions.flatten().tolist() for h in layer.heads] == [[0], [2]]


def test_ragged_from_query_heads_reads_the_right_kv_head():
    layer = _layer()
    layer.keep_per_head([torch.tensor([1]), torch.tensor([2]), torch.tensor([3, 4]), torch.tensor([5])])
    assert len(layer.heads) == 4
    assert torch.equal(layer.heads[2].keys[0, 0, 0], _layer().keys[0, 1, 3])
    layer.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), torch.tensor([[10]]))
    assert layer.heads[3].length == 2


def test_ragged_needs_batch_one():
    layer = LayerCache()
    layer.append(torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 4), torch.arange(5).expand(2, 5))
    with pytest.raises(ValueError, match="batch size 1"):
        layer.keep_per_head([torch.tensor([0]), torch.tensor([1])])


def test_kept_tokens_counts_real_entries_per_kv_head():
    cache = KVCache(num_layers=2, num_kv_heads=2)
    cache.layers = [_layer(), _layer()]
    cache.layers[0].keep_per_head([torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6])])
    assert cache.kept_tokens() == pytest.approx((3 + 10) / 2)
