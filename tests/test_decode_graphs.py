"""Decode steps over fixed-size buffers (what a CUDA graph replays), compiled or not, generate what ordinary decoding
generates."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import prompt_ids, rotated, tiny_model
from method_cases import CASES, method_name

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine, Request
from evalkv.kv.graphs import StaticDecoder
from evalkv.kv.session import Session
from evalkv.kv.slots import SlotDecoder
from evalkv.methods import build_method

NEW_TOKENS = 6


def _prompts(tokenizer) -> list[list[int]]:
    base = prompt_ids(tokenizer)
    return [base, base[7:], prompt_ids(tokenizer, repeats=13)[3:]]


def _mixed_prompts(tokenizer) -> list[list[int]]:
    """`_prompts` and two shorter than a budget of 64: a slot cache's batch holds rows padded with free slots, a full
    cache's rows of different lengths padded to a common one."""
    return [*_prompts(tokenizer), prompt_ids(tokenizer)[:20], prompt_ids(tokenizer)[5:50]]


def _fields(generation) -> tuple:
    return (generation.token_ids, generation.prompt_tokens, generation.kept_tokens, generation.kv_bytes,
            generation.final_kept_tokens, generation.final_kv_bytes, generation.decode_batch)


def _batch_fields(generations, method: str) -> list[tuple]:
    """`_fields` of a batch's generations, but for the full cache without `decode_batch`: its rows decode together
    over fixed-size buffers (padded to a common length) and alone on the ordinary path."""
    return [_fields(g)[:-1] if method == "full" else _fields(g) for g in generations]


# How `_mixed_prompts` decode over fixed-size buffers (graphs): a slot cache pads the two short rows with free slots
# into the batch of the three compressed ones; the full cache pads rows to their length rounded up to 256 entries
# (540-582 -> 768, 20 and 45 -> 256); snapkv keeps the short prompts whole, so they decode alone.
MIXED_BATCHES = {"snapkv": [3, 3, 3, 1, 1], "full": [3, 3, 3, 2, 2], "h2o": [5] * 5, "tova": [5] * 5,
                 "streaming_llm": [5] * 5, "snapkv-decoding": [5] * 5}
# Decoding SnapKV cuts every 8 steps; its steps between cuts replay a `SegmentDecoder`'s graph. 17 new tokens are 16
# decode steps: two segments of 8, each long enough to capture (every row's record then says `decode_graph`). Its
# short rows batch padded with the others (`Method.decodes_padded`).
REPLAYED = {"snapkv-decoding": ("snapkv", {"window_size": 8, "decode_interval": 8, "decode_buffer": 10}, 17)}


def _replayed_method(method: str):
    """(method, new tokens) of a replay test's case: `REPLAYED`'s, or the method with a budget of 64 (the full cache
    without), 12 new tokens."""
    name, options, new_tokens = REPLAYED.get(method, (method, {}, 12))
    return build_method(name, options if method == "full" else {"budget": 64, **options}), new_tokens


def _mixed_batch_fields(generations, method: str, graphed: bool) -> list[tuple]:
    """`_fields` without `decode_batch` (the ordinary path batches only rows of equal shapes), after checking how the
    rows of `_mixed_prompts` decoded together."""
    if graphed:
        assert [g.decode_batch for g in generations] == MIXED_BATCHES[method]
    return [_fields(g)[:-1] for g in generations]


@pytest.mark.parametrize(("case", "architecture"), rotated(CASES))
def test_static_buffers_generate_what_ordinary_decoding_generates(architecture, case, tokenizer):
    """Every method case: alone and batched, same tokens and same memory figures; methods that evict while
    decoding (or keep state) fall back to ordinary decoding. The full cache's rows, which decode alone on the
    ordinary path, decode together over the buffers (padded to a common length)."""
    model = tiny_model(architecture)
    method = build_method(method_name(case), dict(CASES[case]))
    ordinary = Engine(model, method, tokenizer=tokenizer, decode_graphs="off")
    static = Engine(model, method, tokenizer=tokenizer, decode_graphs="eager")
    prompts = _prompts(tokenizer)
    for ids in prompts:
        assert _fields(static.generate(ids, NEW_TOKENS)) == _fields(ordinary.generate(ids, NEW_TOKENS))
    requests = [Request(ids, NEW_TOKENS) for ids in prompts]
    batched, alone = static.generate_batch(requests), ordinary.generate_batch(requests)
    if method.name == "full" and not method.key_channel_ratio:
        assert [g.decode_batch for g in batched] == [3, 3, 3] and [g.decode_batch for g in alone] == [1, 1, 1]
        batched = [dataclasses.replace(g, decode_batch=1) for g in batched]
    assert [_fields(g) for g in batched] == [_fields(g) for g in alone]
    ragged = method.name in {"adakv", "catekv", "kvzip"}  # per-head budgets: no fixed-size buffers
    if method.requires_budget() and not method.acts_while_decoding and not ragged:
        assert static._static is not None, "this method's caches only grow: the static buffers should serve it"


def test_only_caches_that_grow_by_appending_use_static_buffers(tokenizer):
    """snapkv appends while decoding: fixed-size buffers with room for the new tokens; h2o evicts at every step through
    `evict_slot`: a fixed-capacity slot cache; lru evicts at every step without a slot form: ordinary decoding."""
    prompts = _prompts(tokenizer)
    model = tiny_model("tiny-qwen2")
    appending = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="eager")
    slots = Engine(model, build_method("h2o", {"budget": 64}), decode_graphs="eager")
    evicting = Engine(model, build_method("lru", {"budget": 64}), decode_graphs="eager")
    assert appending._static is None
    appending.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts])
    assert type(appending._static[1]) is StaticDecoder
    slots.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts])
    assert type(slots._static[1]) is SlotDecoder
    evicting.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts])
    assert evicting._static is None


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "knorm"])
def test_rows_that_stop_early_keep_their_own_results(method, tokenizer):
    """Stop tokens, token limits and min_new_tokens differ per row; every row stays in the static batch until the
    last one stops, and each row's tokens and final memory equal its lone ordinary run."""
    model = tiny_model("tiny-llama")
    ordinary = Engine(model, build_method(method, {"budget": 64}), decode_graphs="off")
    static = Engine(model, build_method(method, {"budget": 64}), decode_graphs="eager")
    prompts = _prompts(tokenizer)
    free = ordinary.generate(prompts[0], 8)
    requests = [
        Request(prompts[0], 8, stop_token_ids=[free.token_ids[2]]),
        Request(prompts[1], 3),
        Request(prompts[2], 40, stop_token_ids=[free.token_ids[0]], min_new_tokens=4),
        Request(prompts[0], 37),
    ]
    alone = [ordinary.generate(r.prompt_ids, r.max_new_tokens, r.stop_token_ids, min_new_tokens=r.min_new_tokens)
             for r in requests]
    together = static.generate_batch(requests)
    assert [_fields(g)[:-1] for g in together] == [_fields(g)[:-1] for g in alone]
    assert [len(g.token_ids) for g in together][:2] == [3, 3]
    assert len(together[3].token_ids) == 37


def test_a_decoder_is_reused_for_batches_of_the_same_shape(tokenizer):
    """The buffers (and on CUDA the captured graph) serve the next batch with the same shape; its entries replace
    the previous batch's, so results still equal ordinary decoding."""
    model = tiny_model("tiny-llama")
    static = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="eager")
    ordinary = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="off")
    prompts = _prompts(tokenizer)
    first = static.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts[:2]])
    decoder = static._static[1]
    second = static.generate_batch([Request(ids, NEW_TOKENS + 3) for ids in prompts[1:]])
    assert static._static[1] is decoder  # 6 and 9 new tokens both fit the same 32-step buffers
    expected = ordinary.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts[:2]])
    expected += ordinary.generate_batch([Request(ids, NEW_TOKENS + 3) for ids in prompts[1:]])
    assert [g.token_ids for g in first + second] == [g.token_ids for g in expected]


def test_the_full_cache_decoder_is_not_kept(tokenizer):
    """A full cache's buffers are as long as its prompt: they are freed after the sample, not kept for the next."""
    static = Engine(tiny_model(), build_method("full", {}), decode_graphs="eager")
    static.generate(_prompts(tokenizer)[0], NEW_TOKENS)
    assert static._static is None


SLOT_METHODS = ["h2o", "tova", "streaming_llm", "sliding_window"]


def _short_prompts(tokenizer, lengths=(17, 30, 44, 120)) -> list[list[int]]:
    """Prompts of different lengths, those under 48 shorter than the budget of the tests below."""
    base = prompt_ids(tokenizer)
    return [base[index : index + length] for index, length in enumerate(lengths)]


@pytest.mark.parametrize(("method", "architecture"), rotated(SLOT_METHODS))
def test_rows_shorter_than_the_budget_decode_together_in_the_slot_cache(method, architecture, tokenizer):
    """Prompts of different lengths under the budget (and one over it, holding exactly the budget) merge, padded
    with free slots, and decode as one batch through the slot cache, past the point where the shortest fills it:
    each row's tokens and memory figures equal its lone ordinary run."""
    model = tiny_model(architecture)
    ordinary = Engine(model, build_method(method, {"budget": 48}), decode_graphs="off")
    static = Engine(model, build_method(method, {"budget": 48}), decode_graphs="eager")
    prompts = _short_prompts(tokenizer)
    new_tokens = [10, 40, 40, 40]  # the shortest row stops before it fills the cache, the others after
    together = static.generate_batch([Request(ids, count) for ids, count in zip(prompts, new_tokens)])
    alone = [ordinary.generate(ids, count) for ids, count in zip(prompts, new_tokens)]
    assert [_fields(g)[:-1] for g in together] == [_fields(g)[:-1] for g in alone]
    assert [(g.decode_batch, g.decode_static) for g in together] == [(len(prompts), True)] * len(prompts)
    assert type(static._static[1]) is SlotDecoder


def test_one_slot_decoder_serves_batches_of_any_prompt_lengths_under_the_budget(tokenizer):
    """The slot buffers hold C + 1 slots whatever the prompt lengths: the next batch of as many rows (shorter
    prompts, a new longest row) reuses the decoder (on CUDA its captured graph), each row with its own entries."""
    model = tiny_model("tiny-llama")
    static = Engine(model, build_method("h2o", {"budget": 48}), decode_graphs="eager")
    ordinary = Engine(model, build_method("h2o", {"budget": 48}), decode_graphs="off")
    first = static.generate_batch([Request(ids, 12) for ids in _short_prompts(tokenizer, (20, 44))])
    decoder = static._static[1]
    prompts = _short_prompts(tokenizer, (9, 31))
    second = static.generate_batch([Request(ids, 30) for ids in prompts])
    assert static._static[1] is decoder
    assert [g.decode_batch for g in first + second] == [2, 2, 2, 2]
    assert [_fields(g)[:-1] for g in second] == [_fields(ordinary.generate(ids, 30))[:-1] for ids in prompts]


def test_methods_without_a_slot_cache_do_not_pad_rows_of_different_lengths(tokenizer):
    """snapkv appends while decoding: rows under the budget batch only with rows of their own length."""
    static = Engine(tiny_model(), build_method("snapkv", {"budget": 48}), decode_graphs="eager")
    prompts = _short_prompts(tokenizer, (17, 30, 30))
    assert [g.decode_batch for g in static.generate_batch([Request(ids, 4) for ids in prompts])] == [1, 2, 2]


def test_rows_padded_with_free_slots_refuse_eager_decoding(tokenizer):
    """Padding is a free slot only to the slot cache; h2o's eager step would score it as entries: a merged padded
    session that reached the eager path stops with an error instead of decoding wrong."""
    engine = Engine(tiny_model(), build_method("h2o", {"budget": 48}), decode_graphs="off")
    rows = [engine._prefill(Request(ids, 4)) for ids in _short_prompts(tokenizer, (17, 30))]
    sessions = [row.session for row in rows]
    with pytest.raises(ValueError, match="batch keys differ"):
        Session.merge(sessions)
    merged = Session.merge(sessions, fill_to=48)
    assert merged.needs_slots()
    with pytest.raises(RuntimeError, match="free slots"):
        engine._decode(rows, merged)


def test_buffers_refuse_more_steps_than_they_hold(tokenizer):
    engine = Engine(tiny_model(), build_method("snapkv", {"budget": 64}), decode_graphs="off")
    session = engine.generate(_prompts(tokenizer)[0], 1, keep_session=True).session
    decoder = StaticDecoder(engine.model, engine.geometry, session.cache.layers, steps=1, graph=False)
    decoder.load(session.cache.layers, release=False)
    decoder.step([1], [500])
    with pytest.raises(RuntimeError, match="hold 1 steps"):
        decoder.step([1], [501])


def test_a_failed_capture_warns_and_runs_the_steps_without_a_graph(tokenizer, monkeypatch, recwarn):
    """A capture that fails (as cuBLASLt did under CUDA MPS) costs the graph, not the results: the decoder warns once
    and its steps compute what a decoder without a graph computes."""
    engine = Engine(tiny_model(), build_method("snapkv", {"budget": 64}), decode_graphs="off")
    layers = engine.generate(_prompts(tokenizer)[0], 1, keep_session=True).session.cache.layers

    def refuse(decoder):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore detail")

    monkeypatch.setattr(StaticDecoder, "_capture", refuse)
    failing = StaticDecoder(engine.model, engine.geometry, layers, steps=4, graph=True)
    plain = StaticDecoder(engine.model, engine.geometry, layers, steps=4, graph=False)
    for decoder in (failing, plain):
        decoder.load(layers, release=False)
    for step in range(3):
        logits = failing.step([5 + step], [500 + step]).clone()
        assert torch.equal(logits, plain.step([5 + step], [500 + step]))
    assert failing.graph is None and not failing.graph_enabled
    warned = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert warned == ["CUDA-graph capture of the decode step failed (CUDA error: operation failed due to a previous "
                      "error during capture); this batch shape decodes without a graph"]


def test_unknown_decode_graphs_mode_lists_the_known_ones():
    with pytest.raises(EvalkvError, match="auto, off, eager, compile"):
        Engine(tiny_model(), build_method("full", {}), decode_graphs="always")


@pytest.mark.parametrize("architecture", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("method", ["snapkv", "full"])
def test_compiled_steps_generate_what_ordinary_decoding_generates(architecture, method, tokenizer, traced_compile):
    """Alone and batched, same tokens and memory figures; snapkv compiles one step for the lone shape and one for the
    batch of three; the full cache, whose shape changes with every prompt, keeps the uncompiled step."""
    model = tiny_model(architecture)
    options = {"budget": 64} if method == "snapkv" else {}
    ordinary = Engine(model, build_method(method, options), decode_graphs="off")
    compiled = Engine(model, build_method(method, options), decode_graphs="compile")
    prompts = _prompts(tokenizer)
    for ids in prompts:
        generation = compiled.generate(ids, NEW_TOKENS)
        assert _fields(generation) == _fields(ordinary.generate(ids, NEW_TOKENS))
        assert generation.decode_compiled == (method == "snapkv") and not generation.decode_graph
    requests = [Request(ids, NEW_TOKENS) for ids in prompts]
    assert _batch_fields(compiled.generate_batch(requests), method) == _batch_fields(
        ordinary.generate_batch(requests), method)
    assert traced_compile["stats"]["unique_graphs"] == (2 if method == "snapkv" else 0)
    assert not traced_compile["graph_break"]


def test_shapes_past_dynamos_limit_are_not_compiled(tokenizer, traced_compile, recwarn):
    """Past dynamo's recompile limit dynamo would run the step uncompiled without saying so; evalkv stops compiling
    there, warns, and the records say which samples ran compiled code."""
    model = tiny_model("tiny-llama")
    compiled = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="compile")
    ordinary = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="off")
    prompts = _prompts(tokenizer)
    with torch._dynamo.config.patch(recompile_limit=1):
        alone = compiled.generate(prompts[0], NEW_TOKENS)
        batch = compiled.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts])  # a second shape
    assert alone.decode_compiled and not any(g.decode_compiled for g in batch)
    assert [_fields(g) for g in batch] == [_fields(g) for g in
                                           ordinary.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts])]
    assert traced_compile["stats"]["unique_graphs"] == 1
    assert any("recompile_limit" in str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning))


@pytest.mark.parametrize("architecture", ["tiny-llama", "tiny-qwen2"])
def test_a_compiled_step_is_one_graph_compiled_once(architecture, tokenizer, traced_compile):
    """The whole model step traces as one graph with no break, and later steps (new ids, positions and step index in
    the same tensors) run it without recompiling."""
    engine = Engine(tiny_model(architecture), build_method("snapkv", {"budget": 64}), decode_graphs="off")
    session = engine.generate(_prompts(tokenizer)[0], 1, keep_session=True).session
    decoder = StaticDecoder(engine.model, engine.geometry, session.cache.layers, steps=3, graph=False, compiled=True)
    decoder.load(session.cache.layers, release=False)
    with torch.inference_mode():
        decoder.step([1], [500])
        assert traced_compile["stats"]["unique_graphs"] == 1 and not traced_compile["graph_break"]
        with torch.compiler.set_stance("fail_on_recompile"):
            decoder.step([2], [501])
            decoder.step([3], [502])
    assert traced_compile["stats"]["unique_graphs"] == 1


def test_a_compiled_decoder_is_reused_for_batches_of_the_same_shape(tokenizer, traced_compile):
    """The next batch of the same shape reuses the decoder and its compiled step: nothing compiles again."""
    model = tiny_model("tiny-llama")
    compiled = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="compile")
    ordinary = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="off")
    prompts = _prompts(tokenizer)
    first = compiled.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts[:2]])
    decoder, step = compiled._static[1], compiled._static[1]._model_step
    with torch.compiler.set_stance("fail_on_recompile"):
        second = compiled.generate_batch([Request(ids, NEW_TOKENS + 3) for ids in prompts[1:]])
    assert compiled._static[1] is decoder and decoder._model_step is step
    assert traced_compile["stats"]["unique_graphs"] == 1
    expected = ordinary.generate_batch([Request(ids, NEW_TOKENS) for ids in prompts[:2]])
    expected += ordinary.generate_batch([Request(ids, NEW_TOKENS + 3) for ids in prompts[1:]])
    assert [g.token_ids for g in first + second] == [g.token_ids for g in expected]


@pytest.mark.parametrize("method", ["h2o", "tova", "streaming_llm"])
def test_slot_caches_compile_to_one_graph_and_generate_the_ordinary_tokens(method, tokenizer, traced_compile):
    """Methods that evict at every step through `evict_slot`: under "compile" their fixed-capacity step (the model's
    forward and the eviction) traces as one graph with no break, and generates what ordinary decoding generates."""
    requests = [Request(ids, 12) for ids in _prompts(tokenizer)]
    options = {"budget": 64}
    ordinary = Engine(tiny_model(), build_method(method, options), decode_graphs="off").generate_batch(requests)
    compiled = Engine(tiny_model(), build_method(method, options), decode_graphs="compile").generate_batch(requests)
    assert [g.token_ids for g in compiled] == [g.token_ids for g in ordinary]
    assert all(g.decode_compiled and g.decode_static for g in compiled)
    assert traced_compile["stats"]["unique_graphs"] == 1 and not traced_compile["graph_break"]


def test_methods_without_a_slot_form_are_not_compiled(tokenizer, traced_compile):
    """lru evicts at every step with no `evict_slot`: under "compile" it decodes as it always does, and its records
    say so."""
    generations = Engine(tiny_model(), build_method("lru", {"budget": 64}), decode_graphs="compile").generate_batch(
        [Request(ids, NEW_TOKENS) for ids in _prompts(tokenizer)])
    assert not any(g.decode_compiled for g in generations)
    assert not traced_compile["stats"]["unique_graphs"]


def test_inductor_compiled_steps_generate_what_ordinary_decoding_generates(tokenizer, dynamo_counters):
    """The real backend: inductor's generated C++ kernels on the CPU, batched, give the ordinary tokens in fp32."""
    model = tiny_model("tiny-qwen2")
    compiled = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="compile")
    ordinary = Engine(model, build_method("snapkv", {"budget": 64}), decode_graphs="off")
    requests = [Request(ids, NEW_TOKENS) for ids in _prompts(tokenizer)]
    assert [_fields(g) for g in compiled.generate_batch(requests)] == [
        _fields(g) for g in ordinary.generate_batch(requests)]
    assert dynamo_counters["stats"]["unique_graphs"] == 1 and dynamo_counters["inductor"]


class _Replay:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured step, as the graph's kernels would."""

    def __init__(self, decoder: StaticDecoder):
        self.decoder = decoder

    def replay(self) -> None:
        self.decoder.logits = self.decoder._forward()


def _emulated_capture(runs: int):
    def capture(self) -> None:
        """`StaticDecoder._capture` without CUDA: the same uncaptured warm-up runs, then a graph that replays the step
        (capturing records kernels without running them: the state is the warm-up's when the first replay runs)."""
        self._warm_up(runs)
        self.graph = _Replay(self)

    return capture


@pytest.mark.parametrize("method", ["snapkv", "full", "h2o", "tova", "streaming_llm", "snapkv-decoding"])
@pytest.mark.parametrize("warm_up_runs", [1, 2])
def test_the_capture_protocol_generates_what_ordinary_decoding_generates(method, warm_up_runs, tokenizer, monkeypatch):
    """What capturing does to the decoder's state, on the CPU: the warm-up runs before the capture, then the first
    replay runs the same step again. A step that is not idempotent (a slot cache's eviction) must leave no trace of
    its warm-up, or the first replay writes the new entry twice and evicts twice (seen on an H100: h2o, tova and
    streaming_llm replays diverged from their third token). A compiled step warms up twice."""
    monkeypatch.setattr(StaticDecoder, "_capture", _emulated_capture(warm_up_runs))
    monkeypatch.setattr(Engine, "_captures", lambda self: True)
    model = tiny_model("tiny-llama")
    built, new_tokens = _replayed_method(method)
    replayed_engine = Engine(model, built, decode_graphs="auto")
    ordinary = Engine(model, _replayed_method(method)[0], decode_graphs="off")
    requests = [Request(ids, new_tokens) for ids in _mixed_prompts(tokenizer)]
    for _ in range(2):  # the second batch reuses the decoder and its graph
        replayed = replayed_engine.generate_batch(requests)
        assert all(g.decode_graph for g in replayed)
        assert _mixed_batch_fields(replayed, method, True) == _mixed_batch_fields(
            ordinary.generate_batch(requests), method, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method", ["snapkv", "full", "h2o", "tova", "streaming_llm", "snapkv-decoding"])
def test_cuda_graph_replays_generate_what_eager_steps_generate(method, tokenizer):
    """On CUDA in fp32: replayed graphs give the ordinary tokens, batched and alone, across reused graphs (appending
    caches and fixed-capacity slot caches), with rows padded to a batch's common length or capacity."""
    model = tiny_model("tiny-llama").to("cuda")
    built, new_tokens = _replayed_method(method)
    graphed = Engine(model, built, decode_graphs="auto")
    ordinary = Engine(model, _replayed_method(method)[0], decode_graphs="off")
    prompts = _mixed_prompts(tokenizer)
    for _ in range(2):
        requests = [Request(ids, new_tokens) for ids in prompts]
        replayed = graphed.generate_batch(requests)
        assert _mixed_batch_fields(replayed, method, True) == _mixed_batch_fields(
            ordinary.generate_batch(requests), method, False)
        assert all(g.decode_graph for g in replayed)


@pytest.mark.parametrize("options", [
    {"window_size": 4, "decode_interval": 7, "decode_buffer": 4},  # 7 steps a segment, the newest 4 queries kept
    {"window_size": 4, "decode_interval": 5, "decode_buffer": 1},  # the newest query only
])
def test_segments_between_cuts_keep_the_queries_the_cut_reads(options, tokenizer):
    """Segments longer than the query buffer keep only its newest queries (a ring): cuts, tokens, kept sets and bytes
    equal the eager steps', alone and batched (rows of different prompt lengths, some under the budget)."""
    from evalkv.kv.graphs import SegmentDecoder

    model = tiny_model("tiny-llama")
    method = {"budget": 48, **options}
    eager = Engine(model, build_method("snapkv", method), decode_graphs="off")
    segments = Engine(model, build_method("snapkv", method), decode_graphs="eager")
    built = []
    original = SegmentDecoder.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    prompts = _mixed_prompts(tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SegmentDecoder, "__init__", recording_init)
        alone = segments.generate(prompts[0], 30, keep_session=True)
        batched = segments.generate_batch([Request(ids, 30) for ids in prompts])
    reference = eager.generate(prompts[0], 30, keep_session=True)
    assert (alone.token_ids, alone.final_kept_tokens, alone.final_kv_bytes) == (
        reference.token_ids, reference.final_kept_tokens, reference.final_kv_bytes)
    assert [layer.positions.tolist() for layer in alone.session.cache.layers] == [
        layer.positions.tolist() for layer in reference.session.cache.layers]
    expected = [eager.generate(ids, 30) for ids in prompts]
    assert [(g.token_ids, g.final_kept_tokens, g.final_kv_bytes) for g in batched] == [
        (g.token_ids, g.final_kept_tokens, g.final_kv_bytes) for g in expected]
    assert all(g.decode_static for g in batched) and {g.decode_batch for g in batched} == {len(prompts)}
    kept = max(1, options["decode_buffer"])
    assert built and all(decoder.ring == min(kept, decoder.steps) for decoder in built)
    assert any(decoder.steps > decoder.ring for decoder in built)  # the ring wrapped
