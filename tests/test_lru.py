"""LRU (docs/methods.md#lru): access times from attention reads, the most recently read tokens kept."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import SingleLayer

from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.lru import ACCESS


def _brute_force_reads(step, scaling: float, per_kv_head: bool) -> dict[tuple[int, int], int]:
    """(head, position) -> the newest query position of this forward that read it (fp64, row by row)."""
    keys = step.appended_keys.double().repeat_interleave(4 // step.appended_keys.shape[1], dim=1)[0]  # [H, m, d]
    key_positions = step.appended_positions[0]  # [H_kv, m]
    newest = int(key_positions[0, -1])
    reads: dict[tuple[int, int], int] = {}
    for row, position in enumerate(range(newest - step.query.shape[-2] + 1, newest + 1)):
        visible = key_positions[0] <= position  # every head holds the same number of entries up to `position`
        logits = torch.einsum("hd,hmd->hm", step.query[0, :, row].double(), keys) * scaling
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        grouped = probs.reshape(2, 2, -1).mean(dim=1) if per_kv_head else probs.mean(dim=0, keepdim=True)
        threshold = 1.0 / int(visible.sum())
        for head in range(grouped.shape[0]):
            for index in torch.nonzero(grouped[head] > threshold).flatten().tolist():
                reads[(head, int(key_positions[head, index]))] = position
    return reads


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_keeps_the_most_recently_read_tokens_newer_first_on_ties(granularity):
    budget = 12
    method = build_method("lru", {"budget": budget, "granularity": granularity})
    layer = SingleLayer(method, prompt_length=40, seed=7)
    heads = 1 if granularity == "layer" else 2
    access: dict[tuple[int, int], int] = {}
    for step_index in range(8):
        step = layer.prompt() if step_index == 0 else layer.decode()
        for position in step.appended_positions[0, 0].tolist():
            for head in range(heads):
                access.setdefault((head, position), position)  # inserted: accessed at its own position
        for key, position in _brute_force_reads(step, layer.scaling, granularity == "kv_head").items():
            access[key] = max(access[key], position)
        cache = layer.cache
        assert cache.length == budget
        for head in range(heads):
            candidates = step.appended_positions[0, head].tolist()
            expected = sorted(sorted(candidates, key=lambda p: (access[(head, p)], p), reverse=True)[:budget])
            kept = cache.positions[0, head].tolist()
            assert kept == expected
            assert kept[-1] == layer.next_position - 1  # the current token was read now
            assert cache.extras[ACCESS][0, head].tolist() == [access[(head, p)] for p in kept]
    refreshed = [p for p in layer.cache.positions[0, 0].tolist() if access[(0, p)] > p]
    assert refreshed  # some old tokens survive because they were read, not because they are recent


def test_insert_refresh_is_the_sliding_window(tokenizer):
    ids, model = prompt_ids(tokenizer), tiny_model()
    runs = [Engine(model, build_method(name, options)).generate(ids, 6, trace=True)
            for name, options in (("lru", {"budget": 40, "refresh": "insert"}), ("sliding_window", {"budget": 40}))]
    for forward in range(6):
        for lru_layer, window_layer in zip(runs[0].trace[forward], runs[1].trace[forward]):
            assert torch.equal(lru_layer, window_layer)


def test_attention_refresh_differs_from_the_window_and_holds_the_budget(tokenizer):
    ids, model = prompt_ids(tokenizer), tiny_model()
    generation = Engine(model, build_method("lru", {"budget": 40})).generate(ids, 6, trace=True, keep_session=True)
    assert [generation.trace[f][0].shape[-1] for f in range(1, 6)] == [41] * 5
    assert generation.session.cache.lengths() == [40, 40]
    kept = generation.session.cache.layers[0].positions[0, 0]
    assert kept.min() < len(ids) + 5 - 40  # something older than the window was read recently enough
