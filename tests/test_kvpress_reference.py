"""evalkv beside kvpress 0.5.5, the field's reference library (docs/methods.md#kvpress): on one model and prompt,
each method both provide keeps the same positions per layer and KV head after the prompt and generates the same
greedy tokens, with evalkv's options set to kvpress's behaviour where an option exists: SnapKV, Knorm, StreamingLLM,
TOVA, DuoAttention, KVzip, Expected Attention, KeyDiff, ChunkKV (a window and a budget of whole chunks, where its
documented deviations vanish) and CriticalKV over SnapKV. Where a method differs from kvpress by design with no option
(PyramidKV's layer schedule, AdaKV's head allocation), evalkv's scores under kvpress's schedule must reproduce
kvpress's kept sets exactly.

kvpress runs in its own environment (scripts/kvpress_env.py, built once into evalkv's cache from the package
registry; these tests skip with pip's reason when it cannot be built) and its own process
(scripts/kvpress_reference.py), on a seeded tiny model saved as safetensors that both processes load; one reference
run serves every comparison. The comparison as kvpress's pipeline runs it: the context compressed, one question token
fed after it, then greedy decoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from kvpress_harness import Pair, differences, environment, evalkv_run, kept_after_prompt, load_saved, run_reference

from evalkv.errors import EvalkvError
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView
from evalkv.methods.snapkv import SnapKV
from evalkv.models.presets import build_random_model, byte_tokenizer

RATIO = 0.5
NEW_TOKENS = 8
TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 byte tokens
DUO_PATTERN = str(Path(__file__).parent / "data" / "duo_pattern_tiny")  # 2 layers x 2 KV heads, sink 16, recent 64
# SnapKVPress's defaults, and evalkv's snapkv options that compute what it computes: the window's attention averaged
# (evalkv sums: the same ranking), average pooling with zero padding, each query head pooled before the GQA mean.
SNAPKV_PRESS = {"window_size": 64, "kernel_size": 5}
SNAPKV_AS_KVPRESS = {**SNAPKV_PRESS, "pooling": "avg", "gqa_order": "pool_then_reduce", "gqa_reduce": "mean"}
# ChunkKVPress lays its chunks over the whole cache and keeps `int(chunks (1 - ratio))` of them, the window's scored
# highest; evalkv chunks the entries before the window and keeps exactly the budget. A window and a budget of whole
# chunks make both the same computation (540 = 54 chunks of 10, a window of 6, 27 kept).
CHUNKKV_PRESS = {**SNAPKV_PRESS, "window_size": 60}
CHUNKKV_SNAPKV = {**SNAPKV_AS_KVPRESS, "window_size": 60}
PYRAMID = {"compression_ratio": 0.75, "window_size": 4, "kernel_size": 5}  # two layers: a schedule neither trivial

# One entry per method both libraries provide: Pair("<evalkv name>", {<options>}, {"class": "<kvpress press>", <its
# options>}); a regime compared as a method (CriticalKV) is named after it.
PAIRS = {
    "snapkv": Pair("snapkv", {"compression_ratio": RATIO, **SNAPKV_AS_KVPRESS},
                   {"class": "SnapKVPress", "compression_ratio": RATIO, **SNAPKV_PRESS}),
    # Layer 0's keys are a token's key rotated, so their norms tie for repeated tokens: distinct tokens here.
    "knorm": Pair("knorm", {"compression_ratio": RATIO}, {"class": "KnormPress", "compression_ratio": RATIO},
                  prompt="distinct"),
    # evalkv holds the budget while decoding too (kvpress compresses the context only): the first token agrees.
    "streaming_llm": Pair("streaming_llm", {"compression_ratio": RATIO, "n_sink": 4},
                          {"class": "StreamingLLMPress", "compression_ratio": RATIO, "n_sink": 4}, tokens="first"),
    "tova": Pair("tova", {"compression_ratio": RATIO, "decode_interval": None},
                 {"class": "TOVAPress", "compression_ratio": RATIO}),
    "duo_attention-pattern": Pair("duo_attention", {"patterns": DUO_PATTERN, "head_compression_ratio": 0.5},
                                  {"class": "DuoAttentionPress", "head_compression_ratio": 0.5},
                                  extra={"duo_patterns": DUO_PATTERN}),
    "duo_attention-on_the_fly": Pair("duo_attention", {"head_compression_ratio": 0.5},
                                     {"class": "DuoAttentionPress", "head_compression_ratio": 0.5,
                                      "on_the_fly_scoring": True}, extra={"duo_text": TEXT}),
    "kvzip": Pair("kvzip", {"compression_ratio": RATIO, "chunk_size": 200},
                  {"class": "KVzipPress", "compression_ratio": RATIO, "chunk_size": 200}),
    "expected_attention": Pair("expected_attention", {"compression_ratio": RATIO},
                               {"class": "ExpectedAttentionPress", "compression_ratio": RATIO}),
    "keydiff": Pair("keydiff", {"compression_ratio": RATIO}, {"class": "KeyDiffPress", "compression_ratio": RATIO}),
    "chunkkv": Pair("chunkkv", {"compression_ratio": RATIO, **CHUNKKV_SNAPKV, "chunk_length": 10},
                    {"class": "ChunkKVPress", "chunk_length": 10,
                     "press": {"class": "SnapKVPress", "compression_ratio": RATIO, **CHUNKKV_PRESS}}),
    "criticalkv": Pair("snapkv", {"compression_ratio": RATIO, **SNAPKV_AS_KVPRESS, "critical": True},
                       {"class": "CriticalKVPress",
                        "press": {"class": "SnapKVPress", "compression_ratio": RATIO, **SNAPKV_PRESS}}),
}
# Compared below against evalkv's scores under kvpress's own schedule.
BY_DESIGN = {
    "pyramidkv": Pair("pyramidkv", press={"class": "PyramidKVPress", "beta": 20, **PYRAMID}),
    "adakv": Pair("adakv", press={"class": "AdaKVPress", "alpha_safeguard": 0.2,
                                  "press": {"class": "SnapKVPress", "compression_ratio": RATIO, **SNAPKV_PRESS}}),
}


@pytest.fixture(scope="module")
def prompts() -> dict[str, tuple[list[int], list[int]]]:
    """Context and question ids: the repeated sentence, and 256 distinct byte tokens in a seeded order."""
    tokenizer = byte_tokenizer()
    question = tokenizer("?")["input_ids"]
    distinct = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    return {"text": (tokenizer(TEXT)["input_ids"], question), "distinct": (distinct, question)}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """tiny-llama (seed 0) saved as safetensors with the byte tokenizer, without a chat template (so that KVzip's
    repeat prompt is the same text in both libraries)."""
    folder = tmp_path_factory.mktemp("kvpress") / "tiny-llama"
    build_random_model("tiny-llama", torch.float32, torch.device("cpu"), 0).save_pretrained(folder)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_folder, prompts) -> dict:
    return run_reference(environment(), tiny_folder, {**PAIRS, **BY_DESIGN}, prompts, NEW_TOKENS, tiny_folder.parent)


@pytest.fixture(scope="module")
def model(tiny_folder):
    return load_saved(tiny_folder)


def _reference_case(reference: dict, name: str) -> dict:
    case = reference[name]
    assert case["error"] is None, f"kvpress failed on {name}:\n{case['error']}"
    return case


@pytest.mark.parametrize("name", list(PAIRS))
def test_evalkv_keeps_and_generates_what_kvpress_does(name, reference, model, prompts, tiny_folder):
    pair, expected = PAIRS[name], _reference_case(reference, name)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    generation = evalkv_run(model, pair, prompts, NEW_TOKENS, tokenizer)
    kept = kept_after_prompt(generation, len(prompts[pair.prompt][0]), model.config.num_key_value_heads)
    assert kept == expected["kept"], "\n".join(differences(kept, expected["kept"]))
    agreeing = NEW_TOKENS if pair.tokens == "all" else 1
    assert generation.token_ids[:agreeing] == expected["tokens"][:agreeing]


def kvpress_pyramid_budgets(length: int, ratio: float, window: int, beta: int, layers: int) -> list[int]:
    """kvpress 0.5.5 `PyramidKVPress.get_layer_budget`'s schedule (entries per layer, window included), written out:
    float arithmetic from the average `length (1 - ratio)`, SnapKV's uniform budget when the pyramid would not hold."""
    average = length * (1 - ratio)
    smallest = average / beta
    largest = 2 * average - smallest
    if largest >= length - window:
        largest = length - window
        smallest = 2 * average - largest
    if not length >= largest >= smallest >= window:
        return [max(1, round(average))] * layers
    step = (largest - smallest) / (layers - 1)
    return [round(largest - layer * step) for layer in range(layers)]


@dataclass
class SnapKVAtLayerCounts(SnapKV):
    """evalkv's SnapKV selection with given entries per layer (a test-only method)."""

    counts: tuple = ()

    def compress_prompt(self, view: AttentionView):
        return self.select(view, self.counts[view.layer_idx])


def test_pyramidkv_scores_match_kvpress_under_its_layer_schedule(reference, model, prompts):
    """kvpress's schedule (float, from the compression ratio) differs from KVCache-Factory's that evalkv's pyramidkv
    follows; with kvpress's counts, evalkv's SnapKV selection keeps exactly kvpress's entries."""
    expected = _reference_case(reference, "pyramidkv")
    length = len(prompts["text"][0])
    counts = [len(layer[0]) for layer in expected["kept"]]
    assert counts == kvpress_pyramid_budgets(length, PYRAMID["compression_ratio"], PYRAMID["window_size"], 20, 2)
    method = SnapKVAtLayerCounts(**PYRAMID, pooling="avg", gqa_order="pool_then_reduce", counts=tuple(counts))
    kept = kept_after_prompt(evalkv_run(model, Pair(method), prompts, NEW_TOKENS), length, 2)
    assert kept == expected["kept"], "\n".join(differences(kept, expected["kept"]))


@dataclass
class SnapKVUnderKvpressAdaKV(SnapKV):
    """evalkv's SnapKV scores under kvpress's AdaKVPress allocation (a test-only method): each head's
    `int(alpha * capacity)` best entries (the window scores above all) first, then the layer's `heads * capacity`
    best entries over all heads."""

    alpha_safeguard: float = 0.2

    def compress_prompt(self, view: AttentionView):
        capacity, candidates = self.capacity(view.length), view.length - self.window_size
        scores = self.score(view, candidates)
        scores = torch.cat([scores, scores.new_full((*scores.shape[:2], self.window_size), scores.max() + 1)], -1)
        safe = top_k_positions(scores, max(1, int(capacity * self.alpha_safeguard)))
        scores = scores.scatter(-1, safe, float("inf"))
        best = top_k_positions(scores.reshape(1, 1, -1), scores.shape[1] * capacity)[0, 0]
        return [best[best // view.length == head] % view.length for head in range(scores.shape[1])]


def test_adakv_scores_match_kvpress_under_its_head_allocation(reference, model, prompts):
    """kvpress's AdaKVPress allocates per head with a safeguard and one top-k of the layer; evalkv's adakv follows the
    AdaKV reference (docs/methods.md#adakv). Under kvpress's allocation, evalkv's scores keep exactly its entries."""
    expected = _reference_case(reference, "adakv")
    method = SnapKVUnderKvpressAdaKV(compression_ratio=RATIO, **SNAPKV_AS_KVPRESS)
    kept = kept_after_prompt(evalkv_run(model, Pair(method), prompts, NEW_TOKENS), len(prompts["text"][0]), 2)
    assert kept == expected["kept"], "\n".join(differences(kept, expected["kept"]))
    assert len({len(head) for layer in kept for head in layer}) > 1  # heads do keep different numbers


def test_the_reference_ran_kvpress_in_its_own_environment(reference):
    versions = reference["_versions"]
    assert versions["kvpress"] == "0.5.5" and versions["transformers"].startswith("5.2.")


# The embedded real model (Qwen2.5-Coder-0.5B-Instruct, fp32, 24 layers x 2 KV heads) on a short English prompt.
REAL_TEXT = (
    "A language model reads its prompt once and keeps, for every layer and every attention head, a key and a value "
    "for each token it has seen. When the prompt is long, this cache grows larger than the model's own weights, and "
    "generating each new token means reading all of it again. Eviction methods keep only part of the cache: the "
    "tokens that recent queries attended to, the first tokens that absorb attention, or the tokens whose keys stand "
    "out. Whether an answer survives depends on which tokens were kept, so two libraries that claim to implement "
    "the same method should keep the same tokens when given the same model and the same prompt. "
) * 4
# Not criticalkv: kvpress's CriticalKVPress reads `config.head_dim`, which Qwen2's configuration does not define.
REAL_PAIRS = {name: PAIRS[name] for name in ("snapkv", "knorm", "tova", "streaming_llm", "duo_attention-on_the_fly",
                                             "expected_attention", "keydiff")}
REAL_PAIRS["duo_attention-on_the_fly"] = Pair(
    "duo_attention", PAIRS["duo_attention-on_the_fly"].options, PAIRS["duo_attention-on_the_fly"].press,
    extra={"duo_text": REAL_TEXT})
REAL_NEW_TOKENS = 4


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EVALKV_REAL_REFERENCE"), reason="opt-in, about two minutes on two "
                    "cores: EVALKV_REAL_REFERENCE=1; its last run is recorded in docs/methods.md#kvpress")
def test_real_model_keeps_and_generates_what_kvpress_does(tmp_path):
    """The pairs above on the embedded real model (113 s within the suite on two CPU cores: two processes load 2.4 GB
    of fp32 weights and prefill about 500 tokens per method). Opt-in: the tiny-model comparisons run in every suite."""
    from evalkv.models import embedded
    from evalkv.models.config import ModelConfig
    from evalkv.models.loader import load_model

    try:
        embedded._part_files()
    except EvalkvError as error:
        pytest.skip(f"the embedded model's parts are not installed: {error}")
    env = environment()
    loaded = load_model(ModelConfig(name="qwen2.5-coder-0.5b-instruct", source="embedded", device="cpu"))
    folder = Path(loaded.model.config.name_or_path)
    ids = loaded.tokenizer(REAL_TEXT, add_special_tokens=False)["input_ids"]
    question = loaded.tokenizer("?", add_special_tokens=False)["input_ids"]
    distinct = list(dict.fromkeys(ids))  # the text's tokens, each once (knorm: no tied norms in layer 0)
    prompts = {"text": (ids, question), "distinct": (distinct, question)}
    assert len(ids) > 384 + 100  # kvpress's on-the-fly DuoAttention keeps 128 + 256 per streaming head
    reference = run_reference(env, folder, REAL_PAIRS, prompts, REAL_NEW_TOKENS, tmp_path)
    failures = []
    for name, pair in REAL_PAIRS.items():
        expected = _reference_case(reference, name)
        generation = evalkv_run(loaded.model, pair, prompts, REAL_NEW_TOKENS, loaded.tokenizer)
        kept = kept_after_prompt(generation, len(prompts[pair.prompt][0]), loaded.model.config.num_key_value_heads)
        agreeing = REAL_NEW_TOKENS if pair.tokens == "all" else 1
        if kept != expected["kept"] or generation.token_ids[:agreeing] != expected["tokens"][:agreeing]:
            failures.append(f"{name}: tokens {generation.token_ids} vs {expected['tokens']}; "
                            + "; ".join(differences(kept, expected["kept"])[:4]))
    assert failures == []
