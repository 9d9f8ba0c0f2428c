"""Cache-length and kept-set invariants of each core method (docs/methods.md#shared-invariants, #h2o, #snapkv)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import SingleLayer, eager_probs

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.h2o import SCORE
from evalkv.methods.sink_recent_uniform import sink_recent_uniform_keep


def _run(method_name: str, options: dict, tokenizer, new_tokens: int = 6, architecture: str = "tiny-llama"):
    model = tiny_model(architecture)
    ids = prompt_ids(tokenizer)
    generation = Engine(model, build_method(method_name, options)).generate(
        ids, new_tokens, trace=True, keep_session=True
    )
    return ids, generation


def _attended(generation, forward: int, layer: int = 0) -> torch.Tensor:
    """Positions layer `layer` attended to in forward `forward`, [B, H_c, m]."""
    return generation.trace[forward][layer]


# --- SnapKV ---------------------------------------------------------------------------------------------------


def test_snapkv_keeps_observation_window_and_exact_budget(tokenizer):
    ids, generation = _run("snapkv", {"budget": 64, "window_size": 8}, tokenizer, new_tokens=4)
    n = len(ids)
    first_decode = _attended(generation, 1)  # cache after prefill + the fed token
    assert first_decode.shape[-1] == 64 + 1
    for layer_positions in generation.trace[1]:
        tail = layer_positions[..., -9:-1]
        assert (tail == torch.arange(n - 8, n)).all()
    assert generation.session.cache.lengths() == [64 + 3] * 2  # appended, never evicted while decoding


def test_snapkv_leaves_short_prompts_alone(tokenizer):
    ids, generation = _run("snapkv", {"budget": 1000, "window_size": 8}, tokenizer, new_tokens=1)
    assert generation.session.cache.lengths() == [len(ids)] * 2


def test_snapkv_query_head_granularity_selects_per_query_head(tokenizer):
    _, generation = _run("snapkv", {"budget": 64, "window_size": 8, "granularity": "query_head"}, tokenizer, 1)
    layer = generation.session.cache.layers[0]
    assert layer.num_heads == 4 and layer.length == 64
    assert generation.kept_tokens == 64 * 4 / 2  # the GQA copies count at their real memory
    assert not all(torch.equal(layer.positions[0, 0], layer.positions[0, h]) for h in range(1, 4))


@pytest.mark.parametrize("granularity,order", [("kv_head", "reduce_then_pool"), ("kv_head", "pool_then_reduce"),
                                               ("query_head", "reduce_then_pool")])
def test_snapkv_selection_equals_brute_force(granularity, order):
    method = build_method("snapkv", {"budget": 20, "window_size": 4, "kernel_size": 3, "granularity": granularity,
                                     "gqa_order": order})
    layer = SingleLayer(method, prompt_length=50)
    step = layer.prompt()
    query, keys = step.query, step.appended_keys
    scores = eager_probs(query[:, :, -4:], keys)[..., :46].sum(dim=-2)  # [1, H, 46]

    def pool(x):
        return torch.nn.functional.max_pool1d(x.reshape(-1, 1, 46), 3, 1, 1).reshape(x.shape)

    if granularity == "query_head":
        scores = pool(scores)
    elif order == "reduce_then_pool":
        scores = pool(scores.reshape(1, 2, 2, 46).mean(2))
    else:
        scores = pool(scores).reshape(1, 2, 2, 46).mean(2)
    expected = scores.argsort(dim=-1, descending=True, stable=True)[..., :16].sort(dim=-1).values
    expected = torch.cat([expected, torch.arange(46, 50).expand(*expected.shape[:-1], 4)], dim=-1)
    assert torch.equal(layer.cache.positions, expected)


def test_snapkv_rejects_budget_below_window():
    with pytest.raises(EvalkvError, match="smaller than window_size"):
        build_method("snapkv", {"budget": 16, "window_size": 32})


# --- StreamingLLM and sliding window ----------------------------------------------------------------------------


@pytest.mark.parametrize("method,sinks", [("streaming_llm", 4), ("sliding_window", 0)])
def test_position_methods_hold_sinks_and_recent_at_every_step(method, sinks, tokenizer):
    ids, generation = _run(method, {"budget": 40}, tokenizer, new_tokens=6)
    for step in range(1, 6):  # decode forward `step` feeds the token at position n + step - 1
        current = len(ids) + step - 1
        expected = list(range(sinks)) + list(range(current - (40 - sinks), current + 1))
        for layer_positions in generation.trace[step]:
            assert layer_positions.shape[-1] == 41
            assert (layer_positions == torch.tensor(expected)).all()
    assert generation.session.cache.lengths() == [40, 40]


def test_streaming_llm_budget_must_exceed_sinks():
    with pytest.raises(EvalkvError, match="must exceed n_sink"):
        build_method("streaming_llm", {"budget": 4})


# --- H2O ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_h2o_accumulator_equals_brute_force_and_budget_holds(granularity):
    budget, recent = 24, 8
    method = build_method("h2o", {"budget": budget, "recent_size": recent, "granularity": granularity})
    layer = SingleLayer(method, prompt_length=40)
    totals: dict[tuple[int, int], float] = {}  # (selection head, position) -> accumulated attention
    for step in range(8):
        forward = layer.prompt() if step == 0 else layer.decode()
        query, keys, positions = forward.query, forward.appended_keys, forward.appended_positions
        received = eager_probs(query, keys).sum(dim=-2)[0]  # [H, m] over the pre-eviction cache
        if granularity == "kv_head":
            received = received.reshape(2, 2, -1).mean(dim=1)
        heads = received.shape[0]
        for head in range(heads):
            cache_head = head * positions.shape[1] // heads  # before the first eviction a query head reads its KV head
            for index, position in enumerate(positions[0, cache_head].tolist()):
                totals[(head, position)] = totals.get((head, position), 0.0) + float(received[head, index])
        cache = layer.cache
        assert cache.length == budget
        assert cache.num_heads == heads
        newest = layer.next_position
        for head in range(heads):
            kept = cache.positions[0, head].tolist()
            assert kept[-recent:] == list(range(newest - recent, newest))
            expected = torch.tensor([totals[(head, p)] for p in kept], dtype=torch.float32)
            torch.testing.assert_close(cache.extras[SCORE][0, head], expected, atol=1e-5, rtol=1e-5)
            # the heavy part is the best (budget - recent) of the candidates the cache held before this eviction
            candidates = positions[0, head * positions.shape[1] // heads].tolist()[:-recent]
            best = sorted(candidates, key=lambda p: -totals[(head, p)])[: budget - recent]
            assert kept[:-recent] == sorted(best)
    assert not torch.equal(layer.cache.positions[0, 0], layer.cache.positions[0, 1])  # per-head sets


def test_h2o_default_splits_budget_in_half(tokenizer):
    ids, generation = _run("h2o", {"budget": 40}, tokenizer, new_tokens=3)
    positions = generation.session.cache.layers[0].positions[0, 0]
    end = len(ids) + 2
    assert positions[-20:].tolist() == list(range(end - 20, end))
    assert generation.session.cache.lengths() == [40, 40]


# --- TOVA ---------------------------------------------------------------------------------------------------------


def test_tova_keeps_top_of_newest_row_averaged_over_heads():
    method = build_method("tova", {"budget": 12})
    layer = SingleLayer(method, prompt_length=30)
    for step in range(5):
        forward = layer.prompt() if step == 0 else layer.decode()
        query, keys, positions = forward.query, forward.appended_keys, forward.appended_positions
        row = eager_probs(query[:, :, -1:], keys)[0, :, 0].mean(dim=0)
        expected = positions[0, 0][row.argsort(descending=True, stable=True)[:12].sort().values]
        assert layer.cache.length == 12
        for head in range(layer.cache.num_heads):
            assert torch.equal(layer.cache.positions[0, head], expected)


# --- seed 001 sink + recent + uniform middle ----------------------------------------------------------------------


def test_sink_recent_uniform_worked_examples():
    def ranges(kept):
        spans, start = [], kept[0]
        for a, b in zip(kept, kept[1:] + [None]):
            if b != a + 1:
                spans.append((start, a + 1))
                start = b
        return spans

    assert sink_recent_uniform_keep(700, 256, 512, "uniform", 256, 0, 128) is None
    assert ranges(sink_recent_uniform_keep(1000, 256, 512, "none", 0, 0, 128)) == [(0, 256), (488, 1000)]
    # middle blocks 2..18 of 128 (block 19 would overlap the recent window); budget 256 -> 2 blocks: first and last
    kept = sink_recent_uniform_keep(3000, 256, 512, "uniform", 256, 0, 128)
    assert ranges(kept) == [(0, 384), (18 * 128, 19 * 128), (2488, 3000)]
    # stride 5 keeps blocks 2, 7, 12, 17
    kept = sink_recent_uniform_keep(3000, 256, 512, "uniform", 0, 5, 128)
    assert ranges(kept) == [(0, 384), (896, 1024), (1536, 1664), (2176, 2304), (2488, 3000)]
    # sink not aligned: the partial block after it is dropped
    kept = sink_recent_uniform_keep(3000, 200, 512, "uniform", 10_000, 0, 128)
    assert ranges(kept) == [(0, 200), (256, 19 * 128), (2488, 3000)]


def test_sink_recent_uniform_copies_its_indices_to_the_device_once_per_cache_length(tokenizer):
    """Every chunk of a chunked prefill evicts at the same cache length in every layer: the hook hands out one index
    tensor per length (no host-to-device copy per layer), equal to the worked rule."""
    from evalkv.methods.sink_recent_uniform import _kept_indices

    options = {"budget": 200, "sink": 32, "recent": 64, "block_size": 16, "prefill_chunk": 100}
    _kept_indices.cache_clear()
    _run("sink_recent_uniform", options, tokenizer, new_tokens=2)
    info = _kept_indices.cache_info()
    assert info.misses <= 3 < info.hits  # the first chunks' lengths, then the steady 200 + 100 in every layer
    kept = _kept_indices(300, 32, 64, "uniform", 104, 0, 16, torch.device("cpu"))
    assert kept.tolist() == [[sink_recent_uniform_keep(300, 32, 64, "uniform", 104, 0, 16)]]


def test_sink_recent_uniform_evicts_between_chunks_only(tokenizer):
    options = {"budget": 200, "sink": 32, "recent": 64, "block_size": 16, "prefill_chunk": 100}
    ids, generation = _run("sink_recent_uniform", options, tokenizer, new_tokens=5)
    chunks = (len(ids) + 99) // 100
    assert len(generation.trace) == chunks + 4
    for forward in range(1, chunks):  # each chunk saw the previous chunk's compacted cache, never more than target
        seen = generation.trace[forward][0].shape[-1]
        assert seen <= 200 + 100
        assert generation.trace[forward][0][0, 0, :32].tolist() == list(range(32))
    lengths_while_decoding = [generation.trace[f][0].shape[-1] for f in range(chunks, chunks + 4)]
    assert lengths_while_decoding == list(range(lengths_while_decoding[0], lengths_while_decoding[0] + 4))


def test_sink_recent_uniform_budget_below_sink_plus_recent_is_an_error():
    with pytest.raises(EvalkvError, match="below sink"):
        build_method("sink_recent_uniform", {"budget": 128})
    build_method("sink_recent_uniform", {"uniform_stride": 2})  # stride mode needs no budget


# --- budgets --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "streaming_llm", "sliding_window"])
def test_a_method_needs_a_budget(name):
    with pytest.raises(EvalkvError, match="needs a budget"):
        build_method(name, {})


@pytest.mark.parametrize("bad", [0, -5])
def test_non_positive_budget_is_an_error(bad):
    with pytest.raises(EvalkvError, match="positive"):
        build_method("snapkv", {"budget": bad})


def test_compression_ratio_sets_the_budget_from_the_prompt(tokenizer):
    ids, generation = _run("snapkv", {"compression_ratio": 0.75, "window_size": 8}, tokenizer, new_tokens=1)
    assert generation.session.cache.lengths() == [int(len(ids) * 0.25)] * 2
