"""OBCache (docs/methods.md#obcache): the saliency scores are the output perturbations they claim to be, the
attention-only settings reproduce SnapKV and H2O, and the recent + heavy budget holds."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import SingleLayer, eager_probs

from evalkv.errors import EvalkvError
from evalkv.kv.cache import LayerCache
from evalkv.kv.engine import Engine
from evalkv.kv.view import ModelGeometry, Phase
from evalkv.methods import METHODS, build_method
from evalkv.methods.obcache import PRESETS, SCORE, obcache_scores

SCALING = 8 ** -0.5


def _tiny_attention(query_scale: float, seed: int = 0, length: int = 12, rows: int = 3):
    """Random GQA keys/values (2 KV heads) and 4 query heads whose rows are the last `rows` tokens, in fp64."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, length, 8, generator=generator, dtype=torch.float64)
    values = torch.randn(1, 2, length, 8, generator=generator, dtype=torch.float64)
    query = torch.randn(1, 4, rows, 8, generator=generator, dtype=torch.float64) * query_scale
    cache = LayerCache()
    cache.append(keys, values, torch.arange(length)[None, :])
    return query, torch.arange(length - rows, length)[None, :], cache


def _outputs(query, keys, values):
    """Exact attention outputs [B, H, r, d] of the query rows (the last rows of the sequence)."""
    return eager_probs(query, keys, SCALING) @ values.repeat_interleave(2, dim=1)


def _exact_perturbation(query, cache, token: int, zero_value: bool, zero_key: bool):
    """sum_i |o_i' - o_i|^2 per query head when token `token`'s value and/or key is set to zero."""
    keys, values = cache.keys.clone(), cache.values.clone()
    if zero_key:
        keys[:, :, token] = 0
    if zero_value:
        values[:, :, token] = 0
    change = _outputs(query, keys, values) - _outputs(query, cache.keys, cache.values)
    return change.square().sum(dim=(-1, -2))[0]  # [H]


def _scores(query, positions, cache, score, **options):
    output = _outputs(query, cache.keys, cache.values)
    return obcache_scores(query, positions, output, cache, SCALING, score=score, **options)[0].double()  # [H, m]


def test_value_score_is_the_exact_output_change_when_a_value_is_zeroed():
    query, positions, cache = _tiny_attention(query_scale=3.0)
    scores = _scores(query, positions, cache, "V")
    for token in range(cache.length):
        expected = _exact_perturbation(query, cache, token, zero_value=True, zero_key=False)
        torch.testing.assert_close(scores[:, token], expected, rtol=1e-4, atol=1e-7)
    assert scores.min() >= 0 and scores[:, -1].max() > 0


@pytest.mark.parametrize("score,zero_value", [("K", False), ("VK", True)])
def test_key_scores_match_the_output_change_to_first_order(score, zero_value):
    """Zeroing k_j sets its logit to 0; with small logits the first-order OBD terms are close to the exact change,
    and the agreement improves as the logits shrink (second-order error)."""
    errors = []
    for query_scale in (0.05, 0.01):
        query, positions, cache = _tiny_attention(query_scale)
        scores = _scores(query, positions, cache, score)
        exact = torch.stack([_exact_perturbation(query, cache, j, zero_value, zero_key=True)
                             for j in range(cache.length)], dim=-1)
        errors.append(((scores - exact).abs() / exact.abs().clamp_min(1e-12)).max().item())
    assert errors[1] < 0.05
    assert errors[1] < errors[0] / 2


def test_joint_score_without_cross_term_is_the_sum_of_value_and_key_scores():
    query, positions, cache = _tiny_attention(query_scale=1.0)
    joint = _scores(query, positions, cache, "VK", cross=False)
    separate = _scores(query, positions, cache, "V") + _scores(query, positions, cache, "K")
    torch.testing.assert_close(joint, separate)
    assert not torch.allclose(_scores(query, positions, cache, "VK"), joint)  # the cross term matters


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_attention_only_recent_window_setting_reproduces_snapkv(pooling):
    """p=1, no value norm, the last W prompt queries, pooling (kernel 7) == SnapKV per query head
    (docs/methods.md#obcache-presets)."""
    window, budget = 6, 24
    obcache = build_method("obcache", {"budget": budget, "score": "V", "p": 1, "use_vnorm": False,
                                       "num_recent": window, "pooling": pooling, "decode_evict": False})
    snapkv = build_method("snapkv", {"budget": budget, "window_size": window, "kernel_size": 7, "pooling": pooling,
                                     "granularity": "query_head"})
    kept = []
    for method in (obcache, snapkv):
        layer = SingleLayer(method, prompt_length=80, seed=3)
        layer.prompt()
        kept.append(layer.cache.positions)
    assert kept[0].shape == (1, 4, budget)
    assert torch.equal(kept[0], kept[1])


def test_attention_only_fullhist_setting_reproduces_h2o_at_every_step():
    """p=1, no value norm, every prompt query, accumulation, decode eviction == H2O per query head."""
    obcache = build_method("obcache", {"budget": 20, "num_recent": 6, "score": "V", "p": 1, "use_vnorm": False,
                                       "queries": "all"})
    h2o = build_method("h2o", {"budget": 20, "recent_size": 6, "granularity": "query_head"})
    layers = [SingleLayer(method, prompt_length=40, seed=5) for method in (obcache, h2o)]
    for step in range(6):
        for layer in layers:
            layer.prompt() if step == 0 else layer.decode()
        assert torch.equal(layers[0].cache.positions, layers[1].cache.positions)
    assert layers[0].cache.length == 20


def test_scores_accumulate_over_the_recent_prompt_rows_and_every_decode_row():
    method = build_method("kvcV", {"num_recent": 4, "num_heavy": 12})
    layer = SingleLayer(method, prompt_length=30, seed=1)
    totals: dict[tuple[int, int], float] = {}
    for step in range(5):
        seen = layer.prompt() if step == 0 else layer.decode()
        rows = seen.query[:, :, -4:] if step == 0 else seen.query
        probs = eager_probs(rows, seen.keys, SCALING)[0]  # [H, r, m]
        value_norms = seen.values.double().square().sum(-1).repeat_interleave(4 // seen.values.shape[1], dim=1)
        received = probs.square().sum(dim=1) * value_norms[0]  # [H, m]
        for head in range(4):
            for index, position in enumerate(seen.positions[0, head * seen.positions.shape[1] // 4].tolist()):
                totals[(head, position)] = totals.get((head, position), 0.0) + float(received[head, index])
        cache = layer.cache
        assert cache.length == 16 and cache.num_heads == 4
        newest = layer.next_position
        for head in range(4):
            kept = cache.positions[0, head].tolist()
            assert kept[-4:] == list(range(newest - 4, newest))
            expected = torch.tensor([totals[(head, p)] for p in kept], dtype=torch.float32)
            torch.testing.assert_close(cache.extras[SCORE][0, head], expected, rtol=1e-4, atol=1e-7)


def test_tova_variant_uses_the_newest_row_only_and_no_recent_window():
    method = build_method("kvcV+tova", {"budget": 10})
    assert method.split(100) == (0, 10)
    layer = SingleLayer(method, prompt_length=30, seed=2)
    for step in range(4):
        seen = layer.prompt() if step == 0 else layer.decode()
        probs = eager_probs(seen.query[:, :, -1:], seen.keys, SCALING)[0, :, 0]  # [H, m]
        values = seen.values.double().repeat_interleave(4 // seen.values.shape[1], dim=1)[0]
        scores = probs.square() * values.square().sum(-1)
        expected = scores.argsort(dim=-1, descending=True, stable=True)[:, :10].sort(dim=-1).values
        source = seen.positions[0].repeat_interleave(4 // seen.positions.shape[1], dim=0)
        assert torch.equal(layer.cache.positions[0], source.gather(1, expected))
        assert SCORE not in layer.cache.extras


def test_budget_holds_while_decoding_and_prompt_only_mode_appends(tokenizer):
    model, ids = tiny_model("tiny-llama"), prompt_ids(tokenizer)
    every_step = Engine(model, build_method("kvcVK", {"budget": 40})).generate(ids, 6, trace=True, keep_session=True)
    assert [every_step.trace[f][0].shape[-1] for f in range(1, 6)] == [41] * 5
    for layer_positions in every_step.trace[5]:  # query heads select their own sets, recent tail included
        assert (layer_positions[0, :, -2:] == torch.tensor([len(ids) + 3, len(ids) + 4])).all()
        assert layer_positions.shape[1] == 4
    prompt_only = build_method("kvcVK", {"budget": 40, "decode_evict": False})
    generation = Engine(model, prompt_only).generate(ids, 6, keep_session=True)
    assert generation.session.cache.lengths() == [45, 45]
    assert all(SCORE not in layer.extras for layer in generation.session.cache.layers)


def test_ratios_fix_the_split_at_the_prompt_length():
    method = build_method("kvcV", {"recent_ratio": 0.05, "heavy_ratio": 0.2})
    assert method.split(200) == (10, 40) and method.describe() == "kvcV"
    layer = SingleLayer(method, prompt_length=200)
    layer.prompt()
    layer.decode()
    assert layer.cache.length == 50
    assert build_method("kvcV", {"budget": 200}).split(1000) == (10, 190)  # 5 % recent by default
    assert build_method("kvcV", {"num_recent": 16, "num_heavy": 48}).budget == 64


@pytest.mark.parametrize("options,message", [
    ({"budget": 64, "score": "K", "p": 1}, "p must be 2"),
    ({"budget": 64, "recent_ratio": 0.01, "heavy_ratio": 0.1}, "give one way"),
    ({"recent_ratio": 0.1}, "heavy_ratio"),
    ({"num_heavy": 48}, "goes with num_recent"),
    ({"budget": 60, "num_recent": 16, "num_heavy": 48}, "!= num_recent"),
    ({"budget": 64, "num_recent": 65}, "exceeds the budget"),
    ({"budget": 64, "queries": "some"}, "queries must be one of"),
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_method("obcache", options)


def test_zero_recent_tokens_with_recent_queries_is_an_error():
    with pytest.raises(EvalkvError, match="no recent tokens"):
        build_method("kvcV", {"recent_ratio": 0.001, "heavy_ratio": 0.1}).split(100)


def test_presets_carry_the_reference_tags():
    assert len(PRESETS) == 25 and set(PRESETS) <= set(METHODS)
    preset = build_method("kvcVK_no_cross+avgpool", {"budget": 64})
    assert (preset.score, preset.cross, preset.pooling, preset.queries) == ("VK", False, "avg", "recent")
    assert build_method("kvcV_p1_fullhist", {"budget": 64}).p == 1
    assert build_method("kvcK+tova", {"budget": 64}).queries == "latest"


def test_kv_head_granularity_selects_per_kv_head():
    method = build_method("kvcVK", {"budget": 16, "granularity": "kv_head"})
    layer = SingleLayer(method, prompt_length=40, geometry=ModelGeometry(1, 4, 2, 8))
    layer.random(40, Phase.PREFILL)
    assert layer.cache.num_heads == 2 and layer.cache.length == 16
    assert not torch.equal(layer.cache.positions[0, 0], layer.cache.positions[0, 1])
