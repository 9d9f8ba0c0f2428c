"""Knorm (kvpress KnormPress): the lowest key norms per KV head, prompt only, no protected window."""

from __future__ import annotations

import torch
from conftest import prompt_ids, tiny_model
from single_layer import GEOMETRY, SingleLayer

from evalkv.kv.cache import LayerCache
from evalkv.kv.engine import Engine
from evalkv.kv.view import AttentionView, SampleState
from evalkv.methods import build_method


def test_keeps_the_lowest_key_norms_of_each_kv_head():
    layer = SingleLayer(build_method("knorm", {"budget": 10}), prompt_length=30, seed=2)
    prompt = layer.prompt()
    norms = prompt.keys.norm(dim=-1)[0]  # [H_kv, n]
    expected = norms.argsort(dim=-1, stable=True)[:, :10].sort(dim=-1).values
    assert torch.equal(layer.cache.positions[0], expected)
    assert not torch.equal(expected[0], expected[1])
    layer.decode()
    assert layer.cache.length == 11  # generated tokens are appended


def test_no_window_is_protected():
    """Keys whose norm grows with the position: the most recent prompt tokens go first (kvpress keeps no window)."""
    cache = LayerCache()
    keys = torch.arange(1, 31, dtype=torch.float32)[None, None, :, None].expand(1, 2, 30, 8)
    cache.append(keys, torch.zeros_like(keys), torch.arange(30)[None, :])
    sample = SampleState(input_ids=torch.zeros(1, 30, dtype=torch.long), prompt_length=30)
    view = AttentionView(0, GEOMETRY, sample, torch.zeros(1, 4, 30, 8), torch.arange(30)[None, :], 1.0, cache, {})
    keep = build_method("knorm", {"budget": 5}).compress_prompt(view)
    assert keep.tolist() == [[list(range(5))] * 2]


def test_prompt_only_with_compression_ratio(tokenizer):
    ids = prompt_ids(tokenizer)
    method = build_method("knorm", {"compression_ratio": 0.75})
    generation = Engine(tiny_model(), method).generate(ids, 4, keep_session=True)
    assert generation.kept_tokens == int(len(ids) * 0.25)
    assert generation.session.cache.lengths() == [int(len(ids) * 0.25) + 3] * 2
