"""PyramidKV's layer budgets and AdaKV's head budgets (docs/methods.md#pyramidkv, #adakv)."""

from __future__ import annotations

import torch
from conftest import prompt_ids, tiny_model

from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.budgets import adaptive_head_budgets, pyramid_prefix_budgets


def test_pyramid_budgets_follow_the_reference_arithmetic():
    # C = 128, W = 8, beta = 20, 32 layers, a long prompt: min 6, max 234, step (234 - 6) // 31 = 7
    budgets = pyramid_prefix_budgets(120, 8, 10_000, 32, 20)
    assert budgets[0] == 234 and budgets[1] == 227 and budgets[-1] == 234 - 31 * 7
    # a prompt whose prefix is shorter than max: max clamps to the prefix, min rises to keep the mean
    assert pyramid_prefix_budgets(120, 8, 208, 2, 20) == [200, 40]


def _lengths(method: str, options: dict, tokenizer) -> tuple[int, list]:
    ids = prompt_ids(tokenizer)
    generation = Engine(tiny_model("tiny-llama"), build_method(method, options)).generate(ids, 1, keep_session=True)
    return len(ids), generation.session.cache.layers


def test_pyramidkv_lower_layers_keep_more(tokenizer):
    n, layers = _lengths("pyramidkv", {"budget": 64, "window_size": 8}, tokenizer)
    expected = [b + 8 for b in pyramid_prefix_budgets(56, 8, n, 2, 20)]
    assert [layer.length for layer in layers] == expected and expected[0] > expected[1]
    for layer in layers:
        assert (layer.positions[..., -8:] == torch.arange(n - 8, n)).all()


def test_pyramidkv_short_prompts_use_snapkv_or_nothing(tokenizer):
    n, layers = _lengths("pyramidkv", {"budget": 300, "window_size": 8}, tokenizer)  # 300 <= n < 2 * 292
    assert [layer.length for layer in layers] == [300, 300]
    n, layers = _lengths("pyramidkv", {"budget": 600, "window_size": 8}, tokenizer)
    assert [layer.length for layer in layers] == [n, n]


def test_adaptive_budgets_hand_worked():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.1, 0.05, 0.0]])
    assert adaptive_head_budgets(scores, 2, 0.0, False) == [3, 1]  # the 4 best scores: 3 in head 0, 1 in head 1
    # floor int(2 * 0.5) = 1; round(3 * 0.5 + 1) = round(2.5) = 2 and round(1 * 0.5 + 1) = round(1.5) = 2 (half to
    # even, torch.round as the reference)
    assert adaptive_head_budgets(scores, 2, 0.5, False) == [2, 2]
    # normalize: head 1 scaled by (0.3 / 0.35), head 0 by (1.7 / 2.5): the ranking of the 4 best stays 3 + 1
    assert adaptive_head_budgets(scores, 2, 0.0, True) == [3, 1]


def test_adakv_keeps_per_head_budgets_and_the_window(tokenizer):
    n, layers = _lengths("adakv", {"budget": 64, "window_size": 8, "floor_alpha": 0.0}, tokenizer)
    for layer in layers:
        assert layer.is_ragged and len(layer.heads) == 2
        lengths = [head.length for head in layer.heads]
        assert sum(lengths) == 2 * 64  # floor 0: exactly heads * (budget - window) prefix tokens + the windows
        for head in layer.heads:
            assert (head.positions[0, 0, -8:] == torch.arange(n - 8, n)).all()


def test_adakv_union_of_head_selections_is_the_global_top(tokenizer):
    """With floor 0, each head keeps exactly its share of the layer's global top scores."""
    from evalkv.kv.cache import LayerCache
    from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState

    method = build_method("adakv", {"budget": 12, "window_size": 4, "kernel_size": 1, "floor_alpha": 0.0})
    generator = torch.Generator().manual_seed(3)
    layer = LayerCache()
    layer.append(torch.randn(1, 2, 40, 8, generator=generator), torch.randn(1, 2, 40, 8, generator=generator),
                 torch.arange(40)[None])
    query = torch.randn(1, 4, 40, 8, generator=generator) * 3
    view = AttentionView(0, ModelGeometry(1, 4, 2, 8), SampleState(torch.zeros(1, 40, dtype=torch.long), 40), query,
                         torch.arange(40)[None], 8 ** -0.5, layer, {})
    view.sample.phase = Phase.PREFILL
    scores = method.score(view, 36)[0]  # [2, 36]
    top = set(scores.flatten().argsort(descending=True)[:16].tolist())
    kept = method.compress_prompt(view)
    chosen = {h * 36 + int(i) for h, head in enumerate(kept) for i in head[:-4]}
    assert chosen == top
