"""Batched decoding (issue 8): samples decoded together generate exactly what each generates alone."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, rotated, tiny_model
from method_cases import CASES, method_name

from evalkv.kv.engine import Engine, Request
from evalkv.methods import build_method

NEW_TOKENS = 6
# Methods whose decode reads per-sample state (a query buffer, ...) or that keep no budget decode one at a time on the
# ordinary path (ragged per-head caches batch, padded to their longest head; the full cache batches over fixed-size
# buffers, below).
# A scorer's buffered decode queries are batch-major state (`Method.batched_state`): snapkv-decoding,
# expected_attention-decoding and rkv batch.
UNBATCHED = {"full", "sink_recent_uniform-stride", "lacache",
             "segment_two_stage", "segment_two_stage-kv_head-v2", "kmeans-centroid-decode",
             "laq", "duo_attention", "duo_attention-on_the_fly", "duo_attention-all_streaming"}
# Methods whose cache shapes depend on the sample (budgets shared across layers): rows batch where shapes match.
SHAPE_DEPENDENT = {"kvzip-layerwise"}


def _prompts(tokenizer) -> list[list[int]]:
    """Three prompts of different lengths (different true positions while decoding), all above the budgets."""
    base = prompt_ids(tokenizer)
    return [base, base[7:], prompt_ids(tokenizer, repeats=13)[3:]]


@pytest.mark.parametrize(("case", "architecture"), rotated(CASES))
def test_batch_generates_what_each_sample_generates_alone(architecture, case, tokenizer):
    model = tiny_model(architecture)
    engine = Engine(model, build_method(method_name(case), dict(CASES[case])), tokenizer=tokenizer)
    prompts = _prompts(tokenizer)
    alone = [engine.generate(ids, NEW_TOKENS) for ids in prompts]
    together = engine.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts])
    for single, batched in zip(alone, together):
        assert batched.token_ids == single.token_ids
        assert batched.prompt_tokens == single.prompt_tokens
        assert (batched.kept_tokens, batched.kv_bytes) == (single.kept_tokens, single.kv_bytes)
        assert (batched.final_kept_tokens, batched.final_kv_bytes) == (
            single.final_kept_tokens, single.final_kv_bytes)
    if case in SHAPE_DEPENDENT:
        assert all(1 <= g.decode_batch <= len(prompts) for g in together)
        return
    expected = 1 if case in UNBATCHED else len(prompts)
    assert [g.decode_batch for g in together] == [expected] * len(prompts)


@pytest.mark.parametrize("method,options,mode", [
    ("snapkv", {}, "off"), ("h2o", {}, "off"), ("streaming_llm", {}, "off"),
    # buffered queries leave with their row; in segments between cuts (eager), finished rows step on to the end
    ("snapkv", {"window_size": 4, "decode_interval": 3, "decode_buffer": 5}, "off"),
    ("snapkv", {"window_size": 4, "decode_interval": 3, "decode_buffer": 5}, "eager"),
    ("rkv", {"window_size": 4, "decode_interval": 2, "decode_buffer": 4}, "off"),
    ("rkv", {"window_size": 4, "decode_interval": 2, "decode_buffer": 4}, "eager"),
])
def test_rows_leave_the_batch_when_they_stop(method, options, mode, tokenizer):
    """Different stop tokens, token limits and min_new_tokens per row: each row still matches its lone run."""
    model = tiny_model("tiny-qwen2")
    engine = Engine(model, build_method(method, {"budget": 64, **options}), decode_graphs=mode)
    prompts = _prompts(tokenizer)
    free = engine.generate(prompts[0], 8)
    requests = [
        Request(prompts[0], 8, stop_token_ids=[free.token_ids[2]]),  # stops at its third token
        Request(prompts[1], 3),
        Request(prompts[2], 8, stop_token_ids=[free.token_ids[0]], min_new_tokens=4),
        Request(prompts[0], 8),
    ]
    alone = [engine.generate(r.prompt_ids, r.max_new_tokens, r.stop_token_ids, min_new_tokens=r.min_new_tokens)
             for r in requests]
    together = engine.generate_batch(requests)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [(g.final_kept_tokens, g.final_kv_bytes) for g in together] == [
        (g.final_kept_tokens, g.final_kv_bytes) for g in alone]
    assert len(together[1].token_ids) == 3 and len({len(g.token_ids) for g in together}) > 1  # rows left early
    decoded = [g for g in together if len(g.token_ids) > 1]  # a row whose first token stops it never decodes
    assert len(decoded) >= 3 and {g.decode_batch for g in decoded} == {len(decoded)}


def test_max_batch_splits_a_group(tokenizer):
    engine = Engine(tiny_model(), build_method("snapkv", {"budget": 64}))
    prompts = _prompts(tokenizer)
    together = engine.generate_batch([Request(ids, 4) for ids in prompts], max_batch=2)
    assert [g.decode_batch for g in together] == [2, 2, 1]
    assert [g.token_ids for g in together] == [engine.generate(ids, 4).token_ids for ids in prompts]


def test_batch_cache_rows_hold_each_samples_entries(tokenizer):
    """The merged cache is the per-sample caches stacked: same entries, same true positions, row by row."""
    from evalkv.kv.session import Session

    engine = Engine(tiny_model(), build_method("snapkv", {"budget": 64}))
    prompts = _prompts(tokenizer)
    sessions = [engine.generate(ids, 1, keep_session=True).session for ids in prompts]
    merged = Session.merge(sessions)
    assert merged.batch_size == len(prompts)
    for layer_index, layer in enumerate(merged.cache.layers):
        for row, session in enumerate(sessions):
            assert torch.equal(layer.keys[row], session.cache.layers[layer_index].keys[0])
            assert torch.equal(layer.positions[row], session.cache.layers[layer_index].positions[0])
    merged.keep_rows([2])
    assert torch.equal(merged.cache.layers[0].positions[0], sessions[2].cache.layers[0].positions[0])
    assert merged.cache.nbytes == sessions[2].cache.nbytes


def test_sessions_with_different_cache_shapes_do_not_merge(tokenizer):
    from evalkv.kv.session import Session

    prompts = _prompts(tokenizer)
    short = Engine(tiny_model(), build_method("snapkv", {"budget": 64})).generate(prompts[0], 1, keep_session=True)
    long = Engine(tiny_model(), build_method("snapkv", {"budget": 96})).generate(prompts[0], 1, keep_session=True)
    assert short.session.batch_key() != long.session.batch_key()
    with pytest.raises(ValueError, match="cannot decode as one batch"):
        Session.merge([short.session, long.session])


@pytest.mark.parametrize("method,decodes", [("full", 3), ("snapkv", 1)])
def test_caches_do_not_pile_up_while_a_batch_decodes(method, decodes, tokenizer, monkeypatch):
    """full: each sample's whole-prompt cache is released before the next prompt; snapkv: the merged batch replaces
    the per-sample caches (no second copy)."""
    import gc
    import weakref

    engine = Engine(tiny_model(), build_method(method, {"budget": 64} if method == "snapkv" else {}))
    prefilled, others_alive = [], []
    prefill, decode = Engine._prefill, Engine._decode

    def tracking_prefill(self, request, *args, **kwargs):
        row = prefill(self, request, *args, **kwargs)
        prefilled.append(weakref.ref(row.session))
        return row

    def counting_decode(self, rows, session, *args, **kwargs):
        gc.collect()
        others_alive.append(sum(ref() is not None and ref() is not session for ref in prefilled))
        return decode(self, rows, session, *args, **kwargs)

    monkeypatch.setattr(Engine, "_prefill", tracking_prefill)
    monkeypatch.setattr(Engine, "_decode", counting_decode)
    engine.generate_batch([Request(ids, 4) for ids in _prompts(tokenizer)])
    assert others_alive == [0] * decodes


def test_each_request_is_reported_once_when_its_generation_ends(tokenizer):
    """`on_finished` (the progress bar's hook): every index once, a row that stops early before the rest."""
    engine = Engine(tiny_model(), build_method("snapkv", {"budget": 64}))
    prompts = _prompts(tokenizer)
    ended = []
    requests = [Request(prompts[0], 9), Request(prompts[1], 2), Request(prompts[2], 9), Request(prompts[0], 1)]
    engine.generate_batch(requests, on_finished=ended.append)
    assert sorted(ended) == [0, 1, 2, 3]
    assert ended.index(3) < ended.index(1) < min(ended.index(0), ended.index(2))


def test_full_cache_rows_of_different_lengths_batch_over_fixed_size_buffers(tokenizer):
    """Rows padded to their length rounded up to 256 entries decode together over the static buffers, each
    generating, holding and reporting what it does alone; rows that stop early leave the rest decoding."""
    base = prompt_ids(tokenizer)
    prompts = [base[:40], base[:97], base[:300], base[:260], base[:12]]
    budgets = [20, 9, 15, 30, 25]
    alone = Engine(tiny_model(), build_method("full", {}), decode_graphs="off")
    static = Engine(tiny_model(), build_method("full", {}), decode_graphs="eager")
    expected = [alone.generate(ids, new) for ids, new in zip(prompts, budgets)]
    batched = static.generate_batch([Request(ids, new, stop_token_ids=[expected[1].token_ids[4]])
                                     if index == 1 else Request(ids, new)
                                     for index, (ids, new) in enumerate(zip(prompts, budgets))])
    assert [g.decode_batch for g in batched] == [3, 3, 2, 2, 3] and all(g.decode_static for g in batched)
    assert batched[1].token_ids == expected[1].token_ids[:5]  # stopped on its stop token, the others went on
    for index in (0, 2, 3, 4):
        got, want = batched[index], expected[index]
        assert (got.token_ids, got.kept_tokens, got.final_kept_tokens, got.final_kv_bytes) == (
            want.token_ids, want.kept_tokens, want.final_kept_tokens, want.final_kv_bytes)


def test_full_cache_rows_of_long_generations_batch_whatever_their_prompt_lengths(tokenizer):
    """With more steps to come than 256, lengths round up to a multiple of the steps (rounded up to 256): a 40- and a
    270-token prompt generating 260 tokens share a batch (both round up to 512), as a reasoning workload's prompts of
    100-1,000 tokens generating thousands do, and each generates what it does alone."""
    base = prompt_ids(tokenizer)
    prompts = [base[:40], base[:270]]
    alone = Engine(tiny_model(), build_method("full", {}), decode_graphs="off")
    static = Engine(tiny_model(), build_method("full", {}), decode_graphs="eager")
    expected = [alone.generate(ids, 260) for ids in prompts]
    batched = static.generate_batch([Request(ids, 260) for ids in prompts])
    assert [g.decode_batch for g in batched] == [2, 2] and all(g.decode_static for g in batched)
    assert [(g.token_ids, g.final_kept_tokens, g.final_kv_bytes) for g in batched] == [
        (g.token_ids, g.final_kept_tokens, g.final_kv_bytes) for g in expected]
    short = static.generate_batch([Request(ids, 30) for ids in prompts])  # 29 steps: 256 and 512 apart
    assert [g.decode_batch for g in short] == [1, 1]


def test_full_cache_rows_wait_for_a_batch_only_where_the_device_has_room(monkeypatch):
    """On CUDA a full cache waits beside the others only while the decode buffers of all of them (padded length and
    steps, at the cache's bytes per entry) fit in the memory left; a budgeted cache, and any cache off CUDA, always
    may."""
    from types import SimpleNamespace

    from evalkv.kv.engine import _Row

    def row(method: str, options: dict, length: int, nbytes: int, new_tokens: int):
        layers = [SimpleNamespace(length=length)]
        session = SimpleNamespace(method=build_method(method, options), cache=SimpleNamespace(nbytes=nbytes,
                                                                                              layers=layers))
        return _Row(Request([0] * length, new_tokens), session, length, 0.0, 0.0, nbytes, None, tokens=[1])

    full = row("full", {}, length=200, nbytes=2000, new_tokens=65)  # 64 steps to go: buffers of 256 + 64 entries
    assert Engine._buffer_bytes(full, 256) == 2000 * 320 // 200 == 3200
    snapkv = row("snapkv", {"budget": 64}, length=64, nbytes=640, new_tokens=65)
    assert Engine._buffer_bytes(snapkv, 64) == Engine._buffer_bytes(snapkv, None) == 0  # a budgeted row: small
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5000, 80000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 500)
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert Engine._may_hold(gpu, Engine._buffer_bytes(full, 256), waiting=2800)  # 3200 + 2800 <= 5000 + 1000
    assert not Engine._may_hold(gpu, Engine._buffer_bytes(full, 256), waiting=2801)
    assert Engine._may_hold(gpu, Engine._buffer_bytes(snapkv, 64), waiting=10**9)
    assert Engine._may_hold(SimpleNamespace(device=torch.device("cpu")), 3200, waiting=10**9)


@pytest.mark.parametrize("mode", ["off", "eager"])
@pytest.mark.parametrize("case", ["snapkv-decoding", "rkv", "expected_attention-decoding"])
def test_scorers_cutting_while_decoding_batch_rows_shorter_than_the_budget(case, mode, tokenizer):
    """Prompts shorter than the budget (and one longer) decode as one batch padded to the longest row, eagerly (off)
    or in segments over fixed-size buffers between the cuts (eager: what CUDA graphs replay); each cut reads every
    row over its own entries, so every row keeps, holds and generates what it does alone on the eager path, the rows
    reach the budget at different steps, and the padding is gone once every row was cut."""
    from evalkv.kv.session import Session

    options = dict(CASES[case], budget=40)
    alone_engine = Engine(tiny_model("tiny-qwen2"), build_method(method_name(case), options), tokenizer=tokenizer,
                          decode_graphs="off")
    engine = Engine(tiny_model("tiny-qwen2"), build_method(method_name(case), options), tokenizer=tokenizer,
                    decode_graphs=mode)
    base = prompt_ids(tokenizer)
    prompts = [base[:12], base[:23], base[:31], base[:60]]  # 12-31 tokens under the budget, 60 above it
    new_tokens = 36
    alone = [alone_engine.generate(ids, new_tokens, keep_session=True) for ids in prompts]
    merged = []
    original = Session.merge

    def recording_merge(sessions, fill_to=None):
        session = original(sessions, fill_to=fill_to)
        merged.append((fill_to, [layer.padded for layer in session.cache.layers], session))
        return session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Session, "merge", staticmethod(recording_merge))
        together = engine.generate_batch([Request(ids, new_tokens) for ids in prompts])
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [(g.kept_tokens, g.kv_bytes, g.final_kept_tokens, g.final_kv_bytes) for g in together] == [
        (g.kept_tokens, g.kv_bytes, g.final_kept_tokens, g.final_kv_bytes) for g in alone]
    assert [g.decode_batch for g in together] == [len(prompts)] * len(prompts)
    assert all(g.decode_static == (mode == "eager") for g in together)
    [(fill, padded, session)] = merged
    assert fill == 40 and all(padded)  # merged padded to the longest row
    assert not any(layer.padded for layer in session.cache.layers)  # every row cut: no padding left
    final = [g.session.cache.layers[0].positions[0] for g in alone]
    assert len({row.shape[-1] for row in final}) == 1  # each alone ends at the same count: the batch's rows
    assert torch.equal(session.cache.layers[0].positions, torch.stack(final))
