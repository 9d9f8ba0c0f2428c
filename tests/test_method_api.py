"""The method API: the engine derives every decode path from the hooks a method implements, so a method written
the way a third party would write it runs everywhere with the same results (docs/methods.md#the-method-api)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import BUDGET, CASES, method_name
from single_layer import SingleLayer, eager_probs

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine, Request
from evalkv.kv.graphs import decodes_without_hooks
from evalkv.kv.select import top_k_positions
from evalkv.kv.slots import implements_slots
from evalkv.methods import METHODS, build_method, method_names
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.registry import REGISTRY
from evalkv.methods.scorer import Scorer

NEW_TOKENS = 6


@dataclass
class CopiedTova(Method):
    """TOVA as a third party might copy it: a prompt cut and a per-step cut, no flag declaring either."""

    def compress_prompt(self, view: AttentionView):
        capacity = self.capacity(view.sample.prompt_length)
        if view.length <= capacity:
            return None
        row = eager_probs(view.query[:, :, -1:], view.keys, view.scaling)[:, :, 0].float().mean(dim=1, keepdim=True)
        return top_k_positions(row, capacity)

    after_step = compress_prompt


@dataclass
class FirstChannel(Scorer):
    """A prompt-only scorer in a few lines: keep the entries whose keys have the largest first channel."""

    def score(self, view: AttentionView, candidates: int):
        return view.keys[..., :candidates, 0].float()


@pytest.fixture(scope="module")
def third_party():
    """Register the test's own methods as a plug-in would, and remove them afterwards."""
    names = {"test_copied_tova": CopiedTova, "test_first_channel": FirstChannel}
    for name, cls in names.items():
        REGISTRY.register(name)(cls)
    yield names
    for name in names:
        REGISTRY.classes.pop(name)


def _options(name: str) -> dict:
    """A registered method's options for the tiny models: its case in method_cases, else a budget."""
    for case, options in CASES.items():
        if method_name(case) == name:
            return dict(options)
    return {"budget": BUDGET} if METHODS[name].needs_budget else {}


def _kept(session) -> list:
    return [layer.positions.tolist() if not layer.is_ragged else [head.positions.tolist() for head in layer.heads]
            for layer in session.cache.layers]


def _figures(generation) -> tuple:
    return (generation.token_ids, generation.kept_tokens, generation.kv_bytes, generation.final_kept_tokens,
            generation.final_kv_bytes)


@pytest.mark.heavy
def test_every_registered_method_gives_the_same_results_on_every_decode_path(third_party, tokenizer):
    """Eager, batched and fixed-size-buffer decoding: identical tokens, kept sets and bytes; the buffers serve
    exactly the methods without step hooks, that evict through `evict_slot`, or whose hook acts every few steps
    (`segment_steps`: their state batch-major), whose caches stay dense, stateless and full-width (a cache whose key
    channels were pruned, `think`, decodes eagerly)."""
    model = tiny_model("tiny-llama")
    prompts = [prompt_ids(tokenizer, repeats) for repeats in (12, 12, 13)]
    for name in method_names():
        method = build_method(name, _options(name))
        eager = Engine(model, method, tokenizer=tokenizer, decode_graphs="off")
        static = Engine(model, method, tokenizer=tokenizer, decode_graphs="eager")
        alone = eager.generate(prompts[0], NEW_TOKENS, keep_session=True)
        buffered = static.generate(prompts[0], NEW_TOKENS, keep_session=True)
        assert _figures(buffered) == _figures(alone), name
        assert _kept(buffered.session) == _kept(alone.session), name
        session = alone.session
        segments = method.segment_steps(session.sample) is not None  # a scorer's steps between its cuts
        expected_static = ((decodes_without_hooks(method) or implements_slots(method) or segments)
                           and (not session.has_state() or (segments and session.state_batches()))
                           and not any(layer.is_ragged or layer.channels_pruned for layer in session.cache.layers))
        assert buffered.decode_static == expected_static, name
        assert method.acts_while_decoding == (not decodes_without_hooks(method)), name
        requests = [Request(ids, NEW_TOKENS) for ids in prompts]
        one_by_one = [_figures(eager.generate(ids, NEW_TOKENS)) for ids in prompts]
        assert [_figures(g) for g in eager.generate_batch(requests)] == one_by_one, name
        assert [_figures(g) for g in static.generate_batch(requests)] == one_by_one, name


def test_a_copied_decode_time_method_decodes_eagerly_without_declaring_it(third_party, tokenizer):
    """The failure the flags allowed: a TOVA copy without `evicts_while_decoding` kept 64 entries eagerly and 103
    through the buffers. Its step hook is enough for the engine: it holds the budget on every path."""
    model = tiny_model("tiny-qwen2")
    method = build_method("test_copied_tova", {"budget": BUDGET})
    assert method.acts_while_decoding
    for mode in ("off", "eager"):
        generation = Engine(model, method, decode_graphs=mode).generate(prompt_ids(tokenizer), 40,
                                                                         keep_session=True)
        assert not generation.decode_static
        assert generation.session.cache.lengths() == [BUDGET, BUDGET]


def test_a_scorer_gets_every_regime(third_party, tokenizer):
    """A new scorer composes with the shared regimes: per-layer pyramid, adaptive heads, decoding-time cuts."""
    model = tiny_model("tiny-llama")
    ids = prompt_ids(tokenizer)
    pyramid = Engine(model, build_method("test_first_channel", {"budget": 64, "layer_budgets": "pyramid"}))
    lengths = pyramid.generate(ids, 1, keep_session=True).session.cache.lengths()
    assert lengths[0] > lengths[1] and sum(lengths) == 2 * 64
    adaptive = Engine(model, build_method("test_first_channel", {"budget": 64, "head_budgets": "adaptive"}))
    layers = adaptive.generate(ids, 1, keep_session=True).session.cache.layers
    for layer in layers:  # per-head counts round AdaKV's shares: the total is the budget up to one per head
        assert layer.is_ragged and abs(sum(head.length for head in layer.heads) - 2 * 64) <= len(layer.heads)
    assert any(len({head.length for head in layer.heads}) > 1 for layer in layers)
    decoding = Engine(model, build_method("test_first_channel", {"budget": 64, "decode_interval": 5}))
    generation = decoding.generate(ids, 26, keep_session=True)
    assert generation.session.cache.lengths() == [64, 64] and generation.final_kept_tokens == 64


def test_regimes_are_checked_when_built():
    with pytest.raises(EvalkvError, match="layer_budgets must be one of uniform, pyramid, ada_pyramid"):
        build_method("snapkv", {"budget": 64, "layer_budgets": "steps"})
    with pytest.raises(EvalkvError, match="decode_target applies while decoding"):
        build_method("knorm", {"budget": 64, "decode_target": 32})
    with pytest.raises(EvalkvError, match="ragged cache"):
        build_method("adakv", {"budget": 64, "decode_interval": 8})


def test_adaptive_and_pyramid_snapkv_are_adakv_and_pyramidkv(tokenizer):
    """AdaKV(snapkv) and PyramidKV(snapkv) through the regime options equal the registered adakv and pyramidkv."""
    model = tiny_model("tiny-mistral")
    ids = prompt_ids(tokenizer)
    pairs = [({"budget": 64, "window_size": 8, "head_budgets": "adaptive"}, "adakv", {"budget": 64, "window_size": 8}),
             ({"budget": 64, "window_size": 8, "layer_budgets": "pyramid"}, "pyramidkv", {"budget": 64})]
    for snapkv_options, name, options in pairs:
        composed = Engine(model, build_method("snapkv", snapkv_options)).generate(ids, 4, keep_session=True)
        registered = Engine(model, build_method(name, options)).generate(ids, 4, keep_session=True)
        assert composed.token_ids == registered.token_ids
        assert _kept(composed.session) == _kept(registered.session)


# --- decoding-time compression (kvpress DecodingPress semantics) ---------------------------------------------------


def _reference_snapkv_cut(rows, keys, kernel: int, keep: int) -> torch.Tensor:
    """SnapKV's cut of one layer written out, per KV head: the observation rows (the newest entries' queries)
    attend causally over the cache, scores summed over the rows and averaged over the KV head's query heads,
    max-pooled; the best `keep` entries before the rows' own entries, then those. Returns indices `[H_kv, k]`."""
    window, m = rows.shape[-2], keys.shape[2]
    logits = (rows.double() @ keys.double().repeat_interleave(2, dim=1).transpose(-1, -2)) * 8 ** -0.5
    causal = torch.arange(m)[None, :] <= torch.arange(m - window, m)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    scores = probs.sum(dim=-2)[0, :, : m - window].reshape(2, 2, -1).mean(dim=1)
    pooled = torch.nn.functional.max_pool1d(scores[:, None], kernel, 1, kernel // 2)[:, 0]
    best = pooled.argsort(dim=-1, descending=True, stable=True)[:, :keep].sort(dim=-1).values
    return torch.cat([best, torch.arange(m - window, m).expand(2, window)], dim=-1)


@pytest.mark.parametrize("interval,buffer", [(8, 8), (8, 3), (1, 256)])
def test_decoding_cuts_equal_a_straightforward_reference_loop(interval, buffer):
    """Every `interval` steps the cache is cut back to the target with SnapKV's score of the queries since the last
    cut (at most `buffer`, the newest; SnapKV reads the last `window_size` of them); between cuts it grows by one."""
    target, window = 24, 4
    method = build_method("snapkv", {"budget": target, "window_size": window, "kernel_size": 3,
                                     "decode_interval": interval, "decode_buffer": buffer})
    layer = SingleLayer(method, prompt_length=20)  # shorter than the target: the prompt is kept whole
    layer.prompt()
    held = [list(range(20)) for _ in range(2)]  # positions each KV head holds, in cache order
    since_cut = []
    for step in range(1, 61):
        forward = layer.decode()
        for positions in held:
            positions.append(20 + step - 1)
        since_cut.append(forward.query)
        if step % interval == 0:
            rows = torch.cat(since_cut, dim=-2)[:, :, -max(1, buffer):]
            since_cut = []
            if len(held[0]) > target:
                rows = rows[:, :, -min(window, rows.shape[-2]):]
                index = _reference_snapkv_cut(rows, forward.appended_keys, 3, target - rows.shape[-2])
                held = [[positions[i] for i in index[head].tolist()] for head, positions in enumerate(held)]
        assert layer.cache.positions[0].tolist() == held, step
        assert layer.cache.length <= target + interval - 1


def test_decoding_holds_the_cache_at_its_target_through_a_long_generation(tokenizer):
    """2,000 generated tokens: after every cut the cache holds exactly the target, and never more than
    target + interval - 1 entries, whatever the prompt length."""
    target, interval = 96, 50
    method = build_method("snapkv", {"budget": 64, "window_size": 8, "decode_interval": interval,
                                     "decode_target": target, "decode_buffer": 16})
    engine = Engine(tiny_model("tiny-qwen2"), method)
    generation = engine.generate(prompt_ids(tokenizer, 3), 2000, keep_session=True)
    assert len(generation.token_ids) == 2000
    steps = 2000 - 1  # decode forwards (the first token comes from the prompt's logits)
    expected = target + steps % interval if steps >= interval else 64 + steps
    assert generation.session.cache.lengths() == [expected, expected]
    assert generation.final_kept_tokens == expected


@pytest.mark.parametrize("name, options", [("h2o", {}), ("lru", {}), ("obcache", {"score": "V", "queries": "all"}),
                                           ("h2o", {"prefill_chunk": 100}), ("snapkv", {}),
                                           ("obcache", {"score": "VK", "queries": "all"})])
def test_prompt_rows_log_sum_exps_reach_the_methods_that_read_them(tokenizer, monkeypatch, name, options):
    """Where the model's attention returns each row's log-sum-exp (`attend_with_row_lse`: flash attention on CUDA,
    stood in for here), the prompt's hooks of a method with `reads_row_lse` get it in `view.row_lse`; decode steps,
    later prompt chunks (their rows see earlier entries too: the stand-in returns none, as the real one) and other
    methods (and obcache's K and VK scores, which score row blocks of their own) get None, and the scoring functions
    receive what the view holds."""
    from evalkv.kv import attention, session

    calls, received = [], []

    def stand_in(query, keys, values, scaling, backend="sdpa"):
        calls.append(query.shape[-2])
        lse = torch.full(query.shape[:3], 7.0) if query.shape[-2] == keys.shape[-2] else None
        return attention.attend(query, keys, values, scaling, backend), lse

    def recorded(function):
        def wrapper(*args, row_lse=None, **kwargs):
            received.append(None if row_lse is None else float(row_lse.max()))
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(session, "attend_with_row_lse", stand_in)
    module = {"h2o": "evalkv.methods.h2o", "lru": "evalkv.methods.lru", "obcache": "evalkv.methods.obcache",
              "snapkv": "evalkv.methods.snapkv"}[name]
    function = "attention_last_reads" if name == "lru" else "attention_column_sums"
    monkeypatch.setattr(f"{module}.{function}", recorded(getattr(attention, function)))
    method = build_method(name, {"budget": BUDGET, **options})
    prompt = prompt_ids(tokenizer)
    Engine(tiny_model(), method, decode_graphs="off").generate(prompt, 3)
    layers = tiny_model().config.num_hidden_layers
    if name == "snapkv" or options.get("score") == "VK":  # no column sums of every row / none at all
        assert calls == [] and set(received) <= {None}
    elif "prefill_chunk" in options:
        sizes = [min(100, len(prompt) - start) for start in range(0, len(prompt), 100)]
        assert len(sizes) > 2 and calls == [size for size in sizes for _ in range(layers)]
        assert received[:layers] == [7.0] * layers and set(received[layers:]) == {None}
        assert len(received) == (len(sizes) + 2) * layers  # the chunks, then the decode steps before the last token
    else:
        assert calls == [len(prompt)] * layers
        assert received[:layers] == [7.0] * layers and set(received[layers:]) == {None}
