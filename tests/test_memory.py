"""Memory really falls: after eviction the cache's tensors hold exactly the kept entries, no hidden full copy."""

from __future__ import annotations

import pytest
from conftest import prompt_ids, tiny_model
from method_cases import CASES, method_name

from evalkv.kv.engine import Engine
from evalkv.methods import build_method


def _storage_bytes(tensor) -> int:
    return tensor.untyped_storage().nbytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bytes_held_match_kept_entries(case, tokenizer):
    model = tiny_model("tiny-qwen2")
    ids = prompt_ids(tokenizer)
    method = build_method(method_name(case), CASES[case])
    generation = Engine(model, method, tokenizer=tokenizer).generate(ids, 1, keep_session=True)
    cache = generation.session.cache
    expected = 0
    for layer in cache.layers:
        for part in layer.heads if layer.is_ragged else [layer]:  # ragged layers store each head on its own
            entries = part.keys.shape[0] * part.num_heads * part.length
            assert _storage_bytes(part.keys) == _storage_bytes(part.values) == entries * 16 * 4  # head_dim 16, fp32
            expected += 2 * entries * 16 * 4
    assert generation.kv_bytes == cache.nbytes == expected
    assert generation.kept_tokens == pytest.approx(expected / (2 * 16 * 4 * 2 * len(cache.layers)))


def test_eviction_shrinks_the_cache_in_proportion(tokenizer):
    model = tiny_model("tiny-llama")
    ids = prompt_ids(tokenizer)
    full = Engine(model, build_method("full", {})).generate(ids, 1)
    snap = Engine(model, build_method("snapkv", {"budget": 64, "window_size": 8})).generate(ids, 1)
    assert snap.kv_bytes * len(ids) == full.kv_bytes * 64
