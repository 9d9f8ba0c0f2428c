"""KIVI's quantised cache (docs/methods.md#kivi): its formulas against an element-by-element reference, its layout
(keys per channel, values per entry, the exact residuals), the bytes it holds, its attention, and how it composes
with eviction methods, batching, the run's labels and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prompt_ids, tiny_model
from omegaconf import OmegaConf
from report_runs import make_run
from single_layer import SingleLayer

from evalkv.cli import main
from evalkv.config import build_run, compose_run, options
from evalkv.errors import EvalkvError
from evalkv.kv.cache import LayerCache
from evalkv.kv.engine import Engine, Request
from evalkv.kv.quant import Kivi, QuantizedLayer, dequantize, pack_codes, quantize, unpack_codes
from evalkv.kv.view import Phase
from evalkv.methods import build_method
from evalkv.run.pred import check_resumable, run_directory, run_labels
from evalkv.tasks import build_task

# The tiny models' head dimension is 16: groups of 8 channels, a residual of two groups.
KIVI2, KIVI4 = Kivi(2, group_size=8, residual=16), Kivi(4, group_size=8, residual=16)
SNAPKV = {"budget": 64, "window_size": 8}


def reference_group(group: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI on one group, as the paper writes it: zero point min, scale (max - min) / (2^bits - 1), codes rounded and
    clamped; returns (codes, de-quantised numbers)."""
    top = 2 ** bits - 1
    low, high = group.min(), group.max()
    scale = (high - low) / top
    if scale == 0:
        codes = torch.zeros_like(group)
    else:
        codes = torch.clamp(torch.round((group - low) / scale), 0, top)
    return codes, codes * scale + low


def reference_last_dim(x: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_group` on every group of `group_size` consecutive numbers of x's last dimension, one at a time."""
    codes, restored = torch.empty_like(x), torch.empty_like(x)
    flat_x, flat_codes, flat_restored = (t.reshape(-1, x.shape[-1]) for t in (x, codes, restored))
    for row in range(flat_x.shape[0]):
        for start in range(0, x.shape[-1], group_size):
            part = slice(start, start + group_size)
            flat_codes[row, part], flat_restored[row, part] = reference_group(flat_x[row, part], bits)
    return codes, restored


def expected_bytes(entries: int, kivi: Kivi, heads: int = 2, dim: int = 16, element: int = 4) -> int:
    """What one dense layer of `entries` per head holds under KIVI's rules: packed codes, a scale and a zero point
    per group, and the exact residuals."""
    keys_quantized = entries - entries % kivi.residual
    values_quantized = max(0, entries - kivi.residual)
    keys = (keys_quantized * dim * kivi.bits // 8 + 2 * (keys_quantized // kivi.group_size) * dim * element
            + (entries - keys_quantized) * dim * element)
    values = (values_quantized * dim * kivi.bits // 8 + 2 * values_quantized * (dim // kivi.group_size) * element
              + (entries - values_quantized) * dim * element)
    return heads * (keys + values)


def _layer(entries: int, seed: int = 0, heads: int = 2, dim: int = 16) -> LayerCache:
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(1, heads, entries, dim, generator=generator) * 2 for _ in range(2))
    return LayerCache(keys, values, torch.arange(entries).expand(1, heads, entries).clone())


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_matches_the_formulas_group_by_group(bits):
    x = torch.randn(2, 2, 4, 16, generator=torch.Generator().manual_seed(bits)) * 3
    packed, scale, zero = quantize(x, 8, bits)
    codes, restored = reference_last_dim(x, 8, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2, 4, 16 * bits // 8)
    assert scale.shape == zero.shape == (2, 2, 4, 2)
    assert torch.equal(unpack_codes(packed, bits).float(), codes)
    assert torch.equal(dequantize(packed, scale, zero, 8, bits), restored)
    assert not torch.equal(restored, x)  # quantisation changed the numbers...
    top_step = ((x.amax(-1) - x.amin(-1)) / (2 ** bits - 1)).max()
    assert (restored - x).abs().max() <= top_step / 2 + 1e-6  # ...by at most half a step


def test_codes_pack_lowest_bits_first():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([5, 12]), 4).tolist() == [0xC5]
    codes = torch.randint(0, 4, (3, 32))
    assert torch.equal(unpack_codes(pack_codes(codes, 2), 2).long(), codes)


def test_a_constant_group_restores_exactly():
    x = torch.tensor([[1.5] * 8 + list(range(8))])
    packed, scale, zero = quantize(x, 8, 2)
    assert scale[0, 0] == 0 and torch.equal(dequantize(packed, scale, zero, 8, 2)[0, :8], x[0, :8])


@pytest.mark.parametrize("entries", [12, 16, 40, 48])
def test_keys_per_channel_values_per_entry_newest_exact(entries):
    """The prompt's rule: keys quantised in whole blocks of `residual` entries (each channel's groups of group_size
    entries), values but the newest `residual` (each entry's groups of group_size channels); the rest exact."""
    layer = _layer(entries)
    quantized = KIVI2.settle(layer.clone())
    assert isinstance(quantized, QuantizedLayer)
    keys_quantized, values_quantized = entries - entries % 16, max(0, entries - 16)
    assert quantized.quantized_entries == (keys_quantized, values_quantized)
    keys, values = quantized.keys, quantized.values
    assert torch.equal(keys[:, :, keys_quantized:], layer.keys[:, :, keys_quantized:])
    assert torch.equal(values[:, :, values_quantized:], layer.values[:, :, values_quantized:])
    for head in range(2):
        for channel in range(16):
            for start in range(0, keys_quantized, 8):
                _, restored = reference_group(layer.keys[0, head, start : start + 8, channel], 2)
                assert torch.equal(keys[0, head, start : start + 8, channel], restored)
        for entry in range(values_quantized):
            for start in range(0, 16, 8):
                _, restored = reference_group(layer.values[0, head, entry, start : start + 8], 2)
                assert torch.equal(values[0, head, entry, start : start + 8], restored)
    assert torch.equal(quantized.positions, layer.positions)


def test_decode_steps_quantise_full_key_blocks_and_values_leaving_the_residual():
    """Each step's entry joins the residuals; keys are quantised when `residual` have gathered, values as they leave
    the newest `residual`; an entry once quantised never changes."""
    layer, exact = KIVI2.settle(_layer(20)), _layer(20)
    generator = torch.Generator().manual_seed(1)
    for step in range(40):
        keys, values = torch.randn(1, 2, 1, 16, generator=generator), torch.randn(1, 2, 1, 16, generator=generator)
        before_keys, before_values = layer.keys, layer.values
        before = layer.quantized_entries
        layer.append(keys, values, torch.tensor([[20 + step]]))
        exact.append(keys, values, torch.tensor([[20 + step]]))
        layer = KIVI2.settle(layer)
        entries = 21 + step
        assert layer.length == entries
        assert layer.quantized_entries == (entries - entries % 16, entries - 16)
        assert torch.equal(layer.keys[:, :, : before[0]], before_keys[:, :, : before[0]])
        assert torch.equal(layer.values[:, :, : before[1]], before_values[:, :, : before[1]])
        assert torch.equal(layer.keys[:, :, entries - entries % 16 :], exact.keys[:, :, entries - entries % 16 :])
        assert torch.equal(layer.values[:, :, -16:], exact.values[:, :, -16:])
    assert torch.equal(layer.positions, exact.positions)


@pytest.mark.parametrize("entries", [12, 40, 64])
def test_bytes_held_are_codes_scales_zero_points_and_residuals(entries):
    layer = KIVI4.settle(_layer(entries))
    assert layer.nbytes == layer.nbytes_of(0) == expected_bytes(entries, KIVI4)
    for name, part in layer._parts().items():  # no part is a view keeping an exact copy alive
        assert part.untyped_storage().nbytes() == part.numel() * part.element_size(), name
    assert layer.entries == 2 * entries


def _attention_steps(bits: int, steps: int = 12, prompt: int = 40):
    """A full-cache layer (head dimension 8) under KIVI with groups of 4 and a residual of 8, fed known keys and
    values: per decode step, (query, the keys and values its attention read, its output, the exact keys and
    values)."""
    generator = torch.Generator().manual_seed(3)
    total = prompt + steps
    keys, values = torch.randn(1, 2, total, 8, generator=generator), torch.randn(1, 2, total, 8, generator=generator)
    queries = torch.randn(1, 4, total, 8, generator=generator) * 3
    single = SingleLayer(build_method("full", {}), prompt, quantization=Kivi(bits, 4, 8))
    single.forward(keys[:, :, :prompt], values[:, :, :prompt], queries[:, :, :prompt], Phase.PREFILL)
    for t in range(prompt, total):
        step = single.forward(keys[:, :, t : t + 1], values[:, :, t : t + 1], queries[:, :, t : t + 1], Phase.DECODE)
        yield step.query, step.keys, step.values, step.output, keys[:, :, : t + 1], values[:, :, : t + 1]


def _plain_attention(query, keys, values, scaling):
    """One query token over every entry, in fp64: softmax(q k^T * scaling) v, each query head on its KV head."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.double().repeat_interleave(groups, 1), values.double().repeat_interleave(groups, 1)
    return torch.softmax(query.double() @ keys.transpose(-1, -2) * scaling, dim=-1) @ values


@pytest.mark.parametrize("bits", [2, 4])
def test_attention_reads_the_dequantised_entries_within_the_quantisation_bound(bits):
    """The attention over a quantised layer is plain attention over its de-quantised entries; its distance from the
    exact attention stays within what the entries' errors allow: with logits off by at most e, each probability moves
    by a factor within exp(+-2e), so |o' - o| <= max |v' - v| + (exp(2e) - 1) max |v| per channel."""
    scaling = 8 ** -0.5
    errors = []
    for query, keys, values, output, exact_keys, exact_values in _attention_steps(bits):
        assert torch.allclose(output.double(), _plain_attention(query, keys, values, scaling), atol=1e-5)
        exact = _plain_attention(query, exact_keys, exact_values, scaling)
        groups = query.shape[1] // keys.shape[1]
        key_error = (keys - exact_keys).double().abs().repeat_interleave(groups, 1)  # [1, H, m, d]
        logit_error = scaling * (query.double().abs() @ key_error.transpose(-1, -2)).amax(-1, keepdim=True)
        value_error = (values - exact_values).double().abs().amax(-2, keepdim=True).repeat_interleave(groups, 1)
        largest = exact_values.double().abs().amax(-2, keepdim=True).repeat_interleave(groups, 1)
        bound = value_error + torch.expm1(2 * logit_error) * largest
        assert ((output.double() - exact).abs() <= bound + 1e-6).all()
        errors.append((output.double() - exact).abs().mean().item())
    assert min(errors) > 0  # the quantisation reached the output


def test_four_bits_stay_closer_to_the_exact_attention_than_two():
    error = {bits: sum((output.double() - _plain_attention(query, keys, values, 8 ** -0.5)).abs().mean().item()
                       for query, _, _, output, keys, values in _attention_steps(bits)) for bits in (2, 4)}
    assert error[4] < error[2] / 2


@pytest.fixture(scope="module")
def generations(tokenizer):
    """Prompt-only generations on the tiny model, with and without KIVI (one prefill each, then 6 tokens)."""
    model, ids = tiny_model(), prompt_ids(tokenizer)
    runs = {}
    for name, method, settings, kivi in [("snapkv", "snapkv", SNAPKV, None), ("snapkv+kivi2", "snapkv", SNAPKV, KIVI2),
                                         ("full", "full", {}, None), ("full+kivi4", "full", {}, KIVI4)]:
        engine = Engine(model, build_method(method, settings), quantization=kivi)
        runs[name] = (engine.generate(ids, 1, keep_session=True), engine.generate(ids, 6, keep_session=True))
    return runs


def test_snapkv_evicts_on_exact_entries_then_kivi2_quantises_what_it_kept(generations):
    (plain, _), (prompt, decoded) = generations["snapkv"], generations["snapkv+kivi2"]
    for plain_layer, layer in zip(plain.session.cache.layers, prompt.session.cache.layers):
        assert isinstance(layer, QuantizedLayer) and layer.length == 64
        assert torch.equal(layer.positions, plain_layer.positions)  # the same entries chosen as without KIVI
        assert layer.quantized_entries == (64, 48)  # all keys (4 blocks of 16), values but the newest 16
    assert prompt.kept_tokens == plain.kept_tokens == 64
    assert prompt.kv_bytes == 2 * expected_bytes(64, KIVI2) < plain.kv_bytes
    assert len(decoded.token_ids) == 6
    assert decoded.final_kv_bytes == 2 * expected_bytes(69, KIVI2)
    assert all(layer.quantized_entries == (64, 53) for layer in decoded.session.cache.layers)


def test_full_cache_with_kivi4_holds_every_entry_in_fewer_bytes(generations, tokenizer):
    (plain, _), (prompt, decoded) = generations["full"], generations["full+kivi4"]
    entries = len(prompt_ids(tokenizer))
    assert prompt.kept_tokens == plain.kept_tokens == entries
    assert prompt.kv_bytes == 2 * expected_bytes(entries, KIVI4) < plain.kv_bytes / 2
    assert len(decoded.token_ids) == 6 and decoded.decode_batch == 1


def test_prompt_chunks_stay_exact_until_the_prompt_ends(tokenizer):
    """With prefill_chunk, each chunk's eviction reads exact entries: KIVI quantises once the last chunk is done."""
    model, ids = tiny_model(), prompt_ids(tokenizer)
    options = {**SNAPKV, "prefill_chunk": 128}
    plain = Engine(model, build_method("snapkv", options)).generate(ids, 1, keep_session=True)
    quantized = Engine(model, build_method("snapkv", options), quantization=KIVI2).generate(ids, 1, keep_session=True)
    for plain_layer, layer in zip(plain.session.cache.layers, quantized.session.cache.layers):
        assert torch.equal(layer.positions, plain_layer.positions) and layer.quantized_entries == (64, 48)


@pytest.mark.parametrize("method", ["h2o", "tova", "streaming_llm", "sliding_window", "snapkv-decoding"])
def test_eviction_while_decoding_is_refused(method):
    name, extra = ("snapkv", {"decode_interval": 4}) if method == "snapkv-decoding" else (method, {})
    built = build_method(name, {"budget": 64, **extra})
    with pytest.raises(EvalkvError, match="evicts while decoding"):
        Engine(tiny_model(), built, quantization=KIVI2)
    overrides = [f"method={name}", "budget=64", "cache.quant=kivi2", *(f"method.{k}={v}" for k, v in extra.items())]
    with pytest.raises(EvalkvError, match="evicts while decoding"):
        build_run(compose_run(overrides))


@pytest.mark.parametrize("method,settings,refusal", [
    ("snapkv", {"budget": 64, "key_channel_ratio": 0.5}, "prunes key channels"),
    ("kvzip", {"budget": 64}, "re-scores the prompt"),
])
def test_methods_that_change_the_prompt_after_it_are_refused(method, settings, refusal):
    """ThinK's thinned keys and KVzip's replay act on the prompt's cache after KIVI has quantised it."""
    with pytest.raises(EvalkvError, match=refusal):
        KIVI2.check(build_method(method, settings), head_dim=16)


@pytest.mark.parametrize("method,settings", [
    ("full", {}), ("catekv", {}), ("sink_recent_uniform", {"budget": 1024}),
    *((name, {"budget": 64}) for name in ("snapkv", "pyramidkv", "adakv", "chunkkv", "knorm", "keydiff",
                                          "expected_attention", "kmeans")),
    ("obcache", {"budget": 64, "decode_evict": False}), ("snapkv", {"budget": 64, "critical": True}),
])
def test_methods_that_evict_from_the_prompt_only_compose(method, settings):
    """The methods docs/methods.md#kivi lists as composing, at their defaults."""
    KIVI2.check(build_method(method, settings), head_dim=16)


def test_a_quantised_layer_refuses_eviction():
    layer = KIVI2.settle(_layer(40))
    with pytest.raises(RuntimeError, match="cannot evict"):
        layer.keep(torch.arange(10)[None, None])


@pytest.mark.parametrize("method,options", [("snapkv", SNAPKV), ("snapkv", {**SNAPKV, "granularity": "query_head"}),
                                            ("adakv", SNAPKV)])
def test_batched_decoding_equals_one_at_a_time(method, options, tokenizer):
    """Dense quantised layers of equal shapes decode as one batch; ragged ones (per-head budgets) decode alone."""
    engine = Engine(tiny_model("tiny-qwen2"), build_method(method, options), quantization=KIVI2)
    base = prompt_ids(tokenizer)
    prompts = [base, base[7:], prompt_ids(tokenizer, repeats=13)[3:]]
    alone = [engine.generate(ids, 5) for ids in prompts]
    together = engine.generate_batch([Request(ids, 5) for ids in prompts])
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [(g.kv_bytes, g.final_kv_bytes) for g in together] == [(g.kv_bytes, g.final_kv_bytes) for g in alone]
    assert [g.decode_batch for g in together] == [1 if method == "adakv" else 3] * 3


def test_shared_contexts_continue_from_copies_of_the_quantised_prompt(tokenizer):
    engine = Engine(tiny_model(), build_method("snapkv", SNAPKV), quantization=KIVI2)
    ids = prompt_ids(tokenizer)
    questions = [tokenizer(" Who jumps?")["input_ids"], tokenizer(" Over what?")["input_ids"]]
    alone = [engine.generate(ids, 4, suffix_ids=question) for question in questions]
    together = engine.generate_batch([Request(ids, 4, suffix_ids=question) for question in questions])
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.context_reused for g in together] == [False, True]


def test_a_quantised_cache_decodes_eagerly(tokenizer):
    ids = prompt_ids(tokenizer)
    runs = {mode: Engine(tiny_model(), build_method("snapkv", SNAPKV), decode_graphs=mode, quantization=KIVI2)
            .generate(ids, 12) for mode in ("eager", "off")}
    assert runs["eager"].token_ids == runs["off"].token_ids and not runs["eager"].decode_static


def test_value_groups_must_divide_the_head_dimension():
    with pytest.raises(EvalkvError, match="does not divide the model's head dimension 16"):
        Engine(tiny_model(), build_method("snapkv", SNAPKV), quantization=Kivi(2))


@pytest.mark.parametrize("override,message", [
    ("cache.quant=kivi3", "unknown cache.quant 'kivi3' (did you mean 'kivi4' or 'kivi2'?); known: kivi2, kivi4, none"),
    ("cache.quantt=kivi2", "cache has no option 'quantt' (did you mean 'quant'?)"),
    ("cache.group_size=24", "cache.residual must be a positive multiple of cache.group_size (24)"),
    ("cache.group_size=6", "cache.group_size must be a positive multiple of 4"),
    ("cache.residual=big", "cache.residual takes an integer"),
])
def test_bad_cache_settings_are_explained(override, message):
    with pytest.raises(EvalkvError) as error:
        build_run(compose_run(["method=snapkv", "budget=64", "cache.quant=kivi2", override]))
    assert message in str(error.value)


def _built(overrides):
    cfg = compose_run(["model=random-tiny-llama", "method=snapkv", "budget=128", *overrides])
    return cfg, build_method(cfg.method.name, options(cfg.method)), build_task(cfg.task.name, options(cfg.task))


def test_runs_with_and_without_quantisation_never_share_a_folder_or_a_label():
    # KIVI's options mean nothing without cache.quant: they change neither the folder nor the label
    plain, kivi, tuned = (_built(extra) for extra in (["cache.residual=64"], ["cache.quant=kivi2"],
                                                        ["cache.quant=kivi4", "cache.residual=64"]))
    assert [run_directory(*run).name for run in (plain, kivi, tuned)] == [
        "snapkv_128", "snapkv_128+kivi2", "snapkv_128+kivi4-residual=64"]
    assert [run_labels(*run)["cache"] for run in (plain, kivi, tuned)] == ["none", "kivi2", "kivi4-residual=64"]


def test_a_run_resumes_across_kivi_options_only_without_quantisation(tmp_path):
    cfg, method, task = _built(["cache.residual=64"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    composed = OmegaConf.to_container(cfg, resolve=True)
    check_resumable(tmp_path, {**composed, "cache": {**composed["cache"], "residual": 128}}, task, method)
    with pytest.raises(EvalkvError, match="cache.quant: 'none' -> 'kivi2'"):
        check_resumable(tmp_path, {**composed, "cache": {**composed["cache"], "quant": "kivi2"}}, task, method)


def test_tables_show_quantised_runs_on_rows_of_their_own(tmp_path, capsys):
    make_run(tmp_path / "a", ["method=snapkv", "budget=128"], {"task_scores": {"passkey": 40.0}})
    make_run(tmp_path / "b", ["method=snapkv", "budget=128", "cache.quant=kivi2"], {"task_scores": {"passkey": 30.0}})
    assert main(["table", str(tmp_path), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert sorted(rows) == ["random-tiny-llama,snapkv+kivi2,128,30.0,30.0", "random-tiny-llama,snapkv,128,40.0,40.0"]


def test_pred_records_the_quantised_run(tmp_path, capsys):
    overrides = ["model=random-tiny-llama", "model.device=cpu", "progress=false", "method=snapkv", "budget=48",
                 "method.window_size=8", "task.lengths=[256]", "task.n_samples=2", "cache.quant=kivi2",
                 "cache.group_size=8", "cache.residual=16", f"output_dir={tmp_path}"]
    assert main(["pred", *overrides]) == 0
    [info_path] = tmp_path.rglob("run.json")
    assert info_path.parent.name == "snapkv_48-window_size=8+kivi2-group_size=8-residual=16"
    info = json.loads(info_path.read_text())
    assert info["labels"]["cache"] == "kivi2-group_size=8-residual=16"
    records = [json.loads(line) for line in (info_path.parent / "predictions.jsonl").read_text().splitlines()]
    assert [record["kv_bytes"] for record in records] == [2 * expected_bytes(48, KIVI2)] * 2
    refused = [text for text in overrides if not text.startswith(("method", "output_dir"))]
    assert main(["pred", *refused, "method=h2o", f"output_dir={tmp_path / 'h2o'}"]) == 2
    error = capsys.readouterr().err
    assert "evicts while decoding" in error and "Traceback" not in error
    assert not (tmp_path / "h2o").exists()  # refused before a model loaded or a folder was made
