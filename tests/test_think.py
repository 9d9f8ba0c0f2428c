"""ThinK's key channel pruning (docs/methods.md#think): the channels each head keeps follow the paper's score, the
pruned channels leave memory, and attention over the thinned cache is attention over zero-filled keys (what kvpress's
ThinKPress holds), alone and under token eviction, batched or not."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import GEOMETRY, SingleLayer, eager_probs

from evalkv.errors import EvalkvError
from evalkv.kv.channels import attend_pruned, choose_key_channels, prune_keys
from evalkv.kv.engine import Engine, Request
from evalkv.kv.session import Session
from evalkv.kv.view import AttentionView, Phase
from evalkv.methods import build_method
from evalkv.methods.h2o import H2O

RATIO = 0.4


def _papers_kept_channels(rows, keys, ratio: float) -> list[list[int]]:
    """The paper's criterion written out per selection head: channel c scores ||Q_w[:, c] K[:, c]^T||_F, the
    Frobenius norm of the outer product of the window queries' column c (every query head the cache head serves,
    stacked) and the keys' column c; the int(d * ratio) lowest channels go. Returns each head's kept channels."""
    heads, dim = keys.shape[1], keys.shape[-1]
    groups = rows.shape[1] // heads
    kept = []
    for head in range(heads):
        queries = rows[0, head * groups : (head + 1) * groups].reshape(-1, dim).double()
        scores = [torch.linalg.matrix_norm(torch.outer(queries[:, c], keys[0, head, :, c].double())).item()
                  for c in range(dim)]
        pruned = sorted(range(dim), key=lambda c: scores[c])[: int(dim * ratio)]
        kept.append([c for c in range(dim) if c not in pruned])
    return kept


@pytest.mark.parametrize("options,heads", [
    ({"budget": 24, "window_size": 4}, 2),  # one channel set per KV head (query norms averaged over its group)
    ({"budget": 24, "window_size": 4, "granularity": "query_head"}, 4),  # per query head, as the reference
])
def test_kept_channels_follow_the_papers_score_over_the_kept_entries(options, heads):
    method = build_method("snapkv", {**options, "key_channel_ratio": RATIO, "key_channel_window": 6,
                                     "key_channel_recent": 5})
    layer = SingleLayer(method, prompt_length=40, seed=3)
    step = layer.prompt()
    cache = layer.cache
    evicted = SingleLayer(build_method("snapkv", options), prompt_length=40, seed=3)
    evicted.prompt()
    kept_keys = evicted.cache.keys  # SnapKV's kept entries at full width: ThinK scores these
    assert cache.pruned is not None and cache.num_heads == heads
    assert cache.pruned.channels[0].tolist() == _papers_kept_channels(step.query[:, :, -6:], kept_keys, RATIO)
    assert cache.pruned.keys.shape == (1, heads, 24 - 5, 8 - int(8 * RATIO))
    channels = cache.pruned.channels[:, :, None, :].expand(-1, -1, 19, -1)
    assert torch.equal(cache.pruned.keys, kept_keys[:, :, :19].gather(-1, channels))
    assert torch.equal(cache.keys, kept_keys[:, :, 19:])  # the newest `key_channel_recent` keep every channel
    assert torch.equal(cache.positions, evicted.cache.positions) and torch.equal(cache.values, evicted.cache.values)


def test_each_head_of_a_per_head_budget_scores_its_own_entries():
    method = build_method("adakv", {"budget": 16, "window_size": 4, "key_channel_ratio": RATIO,
                                    "key_channel_window": 6, "key_channel_recent": 0})
    layer = SingleLayer(method, prompt_length=40, seed=5)
    step = layer.prompt()
    evicted = SingleLayer(build_method("adakv", {"budget": 16, "window_size": 4}), prompt_length=40, seed=5)
    evicted.prompt()
    assert len({head.length for head in evicted.cache.heads}) > 1
    for index, (head, reference) in enumerate(zip(layer.cache.heads, evicted.cache.heads)):
        rows = step.query[:, 2 * index : 2 * index + 2, -6:]
        assert head.pruned.channels[0].tolist() == _papers_kept_channels(rows, reference.keys, RATIO)
        assert head.keys.shape[-2] == 0 and head.pruned.length == reference.length


def _kvpress_masked_keys(rows, keys, ratio: float):
    """kvpress 0.5.5 ThinKPress.compress's result written out: per KV head, the window queries' mean square per
    channel averaged over the group, times the keys' mean square per channel; the int(d * ratio) lowest channels are
    set to zero in every key. Returns the masked keys and the zeroed channels per head."""
    batch, kv_heads, _, dim = keys.shape
    queries = rows.pow(2).mean(dim=2).view(batch, kv_heads, -1, dim).mean(dim=2)
    scores = queries * keys.pow(2).mean(dim=2)
    zeroed = scores.topk(int(dim * ratio), dim=-1, largest=False).indices
    masked = keys.scatter(-1, zeroed[:, :, None, :].expand(-1, -1, keys.shape[2], -1), 0)
    return masked, zeroed


@pytest.mark.parametrize("q_len", [1, 3])
def test_attention_over_pruned_keys_is_attention_over_zero_filled_keys(q_len):
    """The prompt's keys thinned as kvpress's ThinKPress masks them (key_channel_recent=0), then decode entries at
    full width; batch 2, GQA 4 query heads on 2 KV heads, fp32. One query (decoding) or several (a question fed after
    the prompt, causal among themselves)."""
    generator = torch.Generator().manual_seed(0)
    batch, prompt, later, dim = 2, 20, 4, 8
    keys = torch.randn(batch, 2, prompt, dim, generator=generator) * torch.linspace(0.2, 3, dim)
    values = torch.randn(batch, 2, prompt + later, dim, generator=generator)
    rows = torch.randn(batch, 4, 6, dim, generator=generator)
    kept = choose_key_channels(rows, [keys], RATIO)
    masked, zeroed = _kvpress_masked_keys(rows, keys, RATIO)
    for b in range(batch):
        for h in range(2):
            assert set(kept[b, h].tolist()) == set(range(dim)) - set(zeroed[b, h].tolist())
    pruned, rest = prune_keys(keys, kept, recent=0)
    assert rest.shape[-2] == 0 and pruned.keys.shape == (batch, 2, prompt, dim - int(dim * RATIO))
    newer = torch.randn(batch, 2, later, dim, generator=generator)
    query = torch.randn(batch, 4, q_len, dim, generator=generator)
    output = attend_pruned(query, pruned, newer, values, GEOMETRY.head_dim ** -0.5)
    expected = eager_probs(query, torch.cat([masked, newer], dim=2)) @ values.double().repeat_interleave(2, dim=1)
    torch.testing.assert_close(output.double(), expected, atol=1e-6, rtol=0)
    unmasked = eager_probs(query, torch.cat([keys, newer], dim=2)) @ values.double().repeat_interleave(2, dim=1)
    assert (output.double() - unmasked).abs().max() > 1e-3  # the pruned channels mattered


def test_a_thinned_layer_shows_methods_full_width_keys_with_zeros():
    """`view.keys` of a thinned layer: every entry at full width, zeros in the pruned channels of the thinned ones;
    the newest prompt entries and decoded tokens keep every channel."""
    layer = SingleLayer(build_method("think", {"key_channel_recent": 3}), prompt_length=12)
    prompt = layer.prompt()
    decoded_keys = torch.randn(1, 2, 1, 8)
    layer.forward(decoded_keys, torch.randn(1, 2, 1, 8), torch.randn(1, 4, 1, 8), Phase.DECODE)
    cache = layer.cache
    view = AttentionView(layer_idx=0, geometry=GEOMETRY, sample=layer.sample, query=torch.zeros(1, 4, 1, 8),
                         query_positions=torch.tensor([[12]]), scaling=1.0, cache=cache, state={})
    full = torch.cat([prompt.appended_keys, decoded_keys], dim=2)
    for head, kept in enumerate(cache.pruned.channels[0].tolist()):
        assert len(kept) == 8 - int(8 * RATIO)
        expected = torch.zeros(13, 8)
        expected[:9, kept] = full[0, head, :9, kept]
        expected[9:] = full[0, head, 9:]
        assert torch.equal(view.keys[0, head], expected)
    assert view.length == 13 and torch.equal(cache.keys, full[:, :, 9:])


# --- end to end on the tiny model ----------------------------------------------------------------------------------


class _ZeroMaskedReference(Session):
    """The full cache replayed with fp64 attention in which each forward's query heads see only the positions the
    thinned run attended to (its trace), and the prompt entries it thinned have zeros in the channels it pruned:
    a plain attention over zero-masked keys, written without evalkv's pruned storage."""

    def __init__(self, model, prompt, trace, thinned):
        from evalkv.kv import adapter
        from evalkv.methods import build_method as build

        adapter.install(model)
        super().__init__(build("full", {}), adapter.geometry(model), prompt)
        self.visible, self.thinned, self.forward_index = trace, thinned, -1

    def begin_forward(self, phase, positions, last_chunk=True):
        super().begin_forward(phase, positions, last_chunk)
        self.forward_index += 1

    def attention(self, layer_idx, query, scaling):
        layer = self.cache.layers[layer_idx]
        heads = query.shape[1]
        keys, values = layer.keys.double(), layer.values.double()
        positions = layer.positions[0, 0]
        seen = self.visible[self.forward_index][layer_idx]
        per_head = seen if isinstance(seen, list) else list(seen.split(1, dim=1))
        cache_heads = len(per_head)
        keys = keys.repeat_interleave(cache_heads // keys.shape[1], dim=1)
        values = values.repeat_interleave(cache_heads // values.shape[1], dim=1)
        if self.query_positions[0, 0] >= self.sample.prompt_length:  # the prompt's forwards ran before the thinning
            for head, (thinned_positions, channels) in enumerate(self.thinned[layer_idx]):
                rows = torch.isin(positions, thinned_positions)
                dropped = torch.ones(keys.shape[-1], dtype=torch.bool, device=keys.device)
                dropped[channels] = False
                keys[0, head, rows[:, None] & dropped[None, :]] = 0.0
        allowed = torch.cat([torch.isin(positions, head.flatten())[None] for head in per_head])  # [H_c, m]
        causal = positions[None, :] <= self.query_positions[0, :, None]  # [q, m]
        groups = heads // cache_heads
        logits = query.double() @ keys.repeat_interleave(groups, dim=1).transpose(-1, -2) * scaling
        mask = allowed.repeat_interleave(groups, dim=0)[None, :, None, :] & causal[None, None]
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        return (probs @ values.repeat_interleave(groups, dim=1)).to(query.dtype)


def _thinned(session) -> list[list[tuple[torch.Tensor, list[int]]]]:
    """Per layer and cache head: the positions whose keys lost channels, and the channels they kept."""
    layers = []
    for layer in session.cache.layers:
        parts = layer.heads if layer.is_ragged else [layer]
        heads = []
        for part in parts:
            for head in range(part.num_heads):
                count = 0 if part.pruned is None else part.pruned.length
                channels = [] if part.pruned is None else part.pruned.channels[0, head].tolist()
                heads.append((part.positions[0, head, :count], channels))
        layers.append(heads)
    return layers


def _reference_logits(model, generation):
    from evalkv.kv import adapter

    forwards = generation.forwards
    length = generation.session.sample.prompt_length
    prompt = torch.cat([ids for ids, positions, _ in forwards if positions[0, -1] < length], dim=-1)
    session = _ZeroMaskedReference(model, prompt, generation.trace, _thinned(generation.session))
    cache = adapter.make_cache(session)
    logits = []
    with torch.inference_mode():
        for ids, positions, _ in forwards:
            session.begin_forward(Phase.PREFILL, positions)
            logits.append(adapter.forward(model, ids, positions, cache))
    return logits


CASES = {
    "snapkv": {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO, "key_channel_recent": 8},
    "snapkv-query_head": {"budget": 64, "window_size": 8, "granularity": "query_head", "key_channel_ratio": 0.5,
                          "key_channel_recent": 0},
    "adakv": {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO},
    "knorm-pyramid-chunked": {"budget": 64, "layer_budgets": "pyramid", "prefill_chunk": 200,
                              "key_channel_ratio": RATIO},  # thinned after the last chunk only
    "think": {},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_thinned_run_equals_attention_over_zero_masked_full_cache(case, tokenizer):
    """ThinK over token eviction (per KV head, per query head, per ragged head, after a chunked prefill) and alone
    (with a question fed after the prompt): every forward's logits equal a full-cache replay over the evicted and
    zero-masked keys (fp32 run, fp64 reference); GQA model; and the thinning mattered."""
    model = tiny_model("tiny-llama")
    name = case.split("-")[0]
    ids = prompt_ids(tokenizer)
    suffix = tokenizer("Which animal?")["input_ids"] if name == "think" else None
    engine = Engine(model, build_method(name, CASES[case]), tokenizer=tokenizer)
    generation = engine.generate(ids, 8, suffix_ids=suffix, trace=True, keep_session=True)
    assert any(layer.channels_pruned for layer in generation.session.cache.layers)
    reference = _reference_logits(model, generation)
    assert len(reference) == len(generation.forwards) >= 8
    for (_, _, logits), expected in zip(generation.forwards, reference):
        torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=0)
    plain = {key: value for key, value in CASES[case].items() if not key.startswith("key_channel")}
    untouched = Engine(model, build_method(name, {**plain, "key_channel_ratio": 0.0}), tokenizer=tokenizer).generate(
        ids, 8, suffix_ids=suffix, trace=True)
    first = next(i for i, (_, positions, _) in enumerate(generation.forwards) if positions[0, 0] >= len(ids))
    assert (untouched.forwards[first][2] - generation.forwards[first][2]).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_thinned_runs_equal_the_zero_masked_reference_and_decode_eagerly(tokenizer):
    """On a GPU: ThinK over SnapKV in fp32 equals the zero-masked replay; in bf16 it runs with decode_graphs=auto,
    which leaves thinned caches to the eager path (no graph), and holds fewer bytes than SnapKV alone."""
    from evalkv.models.presets import build_random_model

    options = {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO}
    fp32 = build_random_model("tiny-llama", torch.float32, torch.device("cuda"), seed=0)
    generation = Engine(fp32, build_method("snapkv", options)).generate(prompt_ids(tokenizer), 6, trace=True,
                                                                        keep_session=True)
    for (_, _, logits), expected in zip(generation.forwards, _reference_logits(fp32, generation)):
        torch.testing.assert_close(logits, expected.float(), atol=2e-4, rtol=0)
    bf16 = build_random_model("tiny-llama", torch.bfloat16, torch.device("cuda"), seed=0)
    ids = prompt_ids(tokenizer)
    thinned = Engine(bf16, build_method("snapkv", options)).generate(ids, 12)
    plain = Engine(bf16, build_method("snapkv", {"budget": 64, "window_size": 8})).generate(ids, 12)
    assert len(thinned.token_ids) == 12 and not thinned.decode_static and plain.decode_static
    assert thinned.kv_bytes == plain.kv_bytes - 2 * 2 * (64 - 32) * int(16 * RATIO) * 2


def test_bytes_held_drop_by_the_pruned_channels_of_the_prompt_keys(tokenizer):
    """Keys of the thinned entries hold k = d - int(d * ratio) channels in storage of exactly that size, the newest
    entries and values keep every channel; kv_bytes falls by exactly the pruned channels' bytes."""
    model = tiny_model("tiny-qwen2")
    ids = prompt_ids(tokenizer)
    snap = Engine(model, build_method("snapkv", {"budget": 64, "window_size": 8})).generate(ids, 3)
    think = Engine(model, build_method("snapkv", {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO}))
    thinned = think.generate(ids, 3, keep_session=True)
    dim, pruned, recent = 16, int(16 * RATIO), 32
    layers = thinned.session.cache.layers
    for layer in layers:
        assert layer.pruned.keys.untyped_storage().nbytes() == 2 * (64 - recent) * (dim - pruned) * 4
        assert layer.keys.untyped_storage().nbytes() == 2 * (recent + 2) * dim * 4  # + the two decoded tokens
        assert layer.values.untyped_storage().nbytes() == 2 * (64 + 2) * dim * 4
    saved = len(layers) * 2 * (64 - recent) * pruned * 4
    assert thinned.kv_bytes == snap.kv_bytes - saved and thinned.final_kv_bytes == snap.final_kv_bytes - saved
    assert thinned.kept_tokens == snap.kept_tokens == 64


def test_thinned_samples_decode_in_a_batch_as_they_do_alone(tokenizer):
    """Equal budgets give equal shapes: the samples decode together (eagerly: not through fixed-size buffers), rows
    leaving the batch as they stop, and each generates what it generates alone; a per-head budget decodes alone."""
    model = tiny_model("tiny-mistral")
    method = build_method("snapkv", {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO})
    base = prompt_ids(tokenizer)
    prompts = [base, base[7:], prompt_ids(tokenizer, repeats=13)[3:]]
    eager = Engine(model, method, tokenizer=tokenizer, decode_graphs="off")
    free = eager.generate(prompts[0], 6)
    requests = [Request(prompts[0], 6, stop_token_ids=[free.token_ids[2]]), Request(prompts[1], 3),
                Request(prompts[2], 6)]
    alone = [eager.generate(r.prompt_ids, r.max_new_tokens, r.stop_token_ids) for r in requests]
    for engine in (eager, Engine(model, method, tokenizer=tokenizer, decode_graphs="eager")):
        together = engine.generate_batch(requests)
        figures = [(g.token_ids, g.kv_bytes, g.final_kv_bytes) for g in together]
        assert figures == [(g.token_ids, g.kv_bytes, g.final_kv_bytes) for g in alone]
        assert [g.decode_batch for g in together] == [3, 3, 3] and not any(g.decode_static for g in together)
    adaptive = Engine(model, build_method("adakv", {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO}))
    assert [g.decode_batch for g in adaptive.generate_batch([Request(ids, 3) for ids in prompts])] == [1, 1, 1]


def test_questions_about_one_thinned_context_each_continue_from_their_own_copy(tokenizer):
    model = tiny_model("tiny-llama")
    engine = Engine(model, build_method("snapkv", {"budget": 64, "window_size": 8, "key_channel_ratio": RATIO}))
    context = prompt_ids(tokenizer)
    questions = [tokenizer(text)["input_ids"] for text in ("Which animal?", "What colour?")]
    shared = engine.generate_batch([Request(context, 5, suffix_ids=q) for q in questions])
    assert [g.context_reused for g in shared] == [False, True]
    assert [g.token_ids for g in shared] == [engine.generate(context, 5, suffix_ids=q).token_ids for q in questions]


# --- refused combinations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options,message", [
    ("h2o", {"budget": 64}, "h2o with these options also acts after it \\(after_step\\)"),
    ("snapkv", {"budget": 64, "decode_interval": 4}, "drop its decoding-time options"),
    ("segment_two_stage", {"budget": 64}, "before_step"),
])
def test_methods_that_act_while_decoding_refuse_channel_pruning_when_built(name, options, message):
    with pytest.raises(EvalkvError, match=message):
        build_method(name, {**options, "key_channel_ratio": RATIO})
    build_method(name, options)  # the method itself is fine


@pytest.mark.parametrize("options", [{"key_channel_ratio": 1.0}, {"key_channel_ratio": -0.1},
                                     {"key_channel_window": 0}, {"key_channel_recent": -1}])
def test_channel_options_out_of_range_are_refused(options):
    with pytest.raises(EvalkvError, match="need key_channel_ratio in \\[0, 1\\), key_channel_window >= 1"):
        build_method("think", options)


def test_the_engine_refuses_a_thinning_method_built_around_the_check():
    layer = SingleLayer(H2O(budget=8, key_channel_ratio=RATIO), prompt_length=12)
    with pytest.raises(RuntimeError, match="h2o: key channel pruning needs a method that compresses the prompt only"):
        layer.prompt()


def test_a_thinned_layer_refuses_eviction():
    layer = SingleLayer(build_method("think", {"key_channel_recent": 0}), prompt_length=12)
    layer.prompt()
    with pytest.raises(RuntimeError, match="nothing may be evicted"):
        layer.cache.keep(torch.arange(4)[None, None, :])
    with pytest.raises(RuntimeError, match="pruned once"):
        layer.cache.prune_key_channels(layer.cache.pruned.channels, 0)


def test_a_ratio_too_small_to_drop_a_channel_leaves_the_cache_whole():
    layer = SingleLayer(build_method("think", {"key_channel_ratio": 0.1}), prompt_length=12)  # int(8 * 0.1) = 0
    layer.prompt()
    assert layer.cache.pruned is None and layer.cache.keys.shape == (1, 2, 12, 8)
