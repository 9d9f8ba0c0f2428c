"""DuoAttention (docs/methods.md#duo_attention): the authors' pattern files, the head ranking, what retrieval and
streaming heads keep, and kvpress's on-the-fly head scores against a computation from the model's own modules."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import DUO_PATTERN
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.duo_attention import read_pattern, streaming_heads
from evalkv.models.presets import build_random_model
from evalkv.run.pred import method_label

NEW_TOKENS = 3


def test_pattern_files_are_read_as_the_authors_write_them(tmp_path):
    # load_attn_pattern clips the trained gates to [0, 1]; the authors' files hold small negative gates
    (tmp_path / "full_attention_heads.tsv").write_text("-9.5844e-05\t1.0000e+00\n5.5859e-01\t1.2e+00\n")
    (tmp_path / "config.json").write_text('{"sink_size": 128, "recent_size": 256, "lr": 0.02}')
    gates, sink, recent = read_pattern(tmp_path)
    assert gates.tolist() == [[0.0, 1.0], [0.55859, 1.0]] and (sink, recent) == (128, 256)
    assert read_pattern(tmp_path / "full_attention_heads.tsv")[0].tolist() == gates.tolist()
    (tmp_path / "config.json").unlink()
    assert read_pattern(tmp_path)[1:] == (None, None)
    with pytest.raises(EvalkvError, match="set method.sink_size and method.recent_size"):
        Engine(tiny_model(), build_method("duo_attention", {"patterns": str(tmp_path)}))
    assert build_method("duo_attention", {"patterns": str(tmp_path), "sink_size": 4, "recent_size": 8}).sizes() == (
        4, 8)


def test_unreadable_patterns_and_other_models_patterns_are_refused(tmp_path, tokenizer):
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\tx\n")
    with pytest.raises(EvalkvError, match="one tab-separated gate per KV head"):
        read_pattern(tmp_path)
    with pytest.raises(EvalkvError, match="cannot read the head pattern"):
        Engine(tiny_model(), build_method("duo_attention", {"patterns": str(tmp_path / "missing")}))
    (tmp_path / "full_attention_heads.tsv").write_text("0.5\t0.1\t0.2\n0.3\t0.4\t0.9\n")
    engine = Engine(tiny_model(), build_method("duo_attention", {"patterns": str(tmp_path), "sink_size": 4,
                                                                 "recent_size": 8}))
    with pytest.raises(EvalkvError, match=r"is \(2, 3\) \(layers x KV heads\) but the model has 2 layers and 2"):
        engine.generate(prompt_ids(tokenizer), 1)


def test_streaming_heads_are_the_lowest_scores_of_the_whole_model():
    gates = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    assert streaming_heads(gates, 0.5, None).tolist() == [[False, True], [True, False]]
    assert streaming_heads(gates, 0.75, None).tolist() == [[False, True], [True, True]]
    assert streaming_heads(gates, 0.0, None).sum() == 0 and streaming_heads(gates, 1.0, None).all()
    assert streaming_heads(torch.full((2, 2), 0.5), 0.25, None).tolist() == [[True, False], [False, False]]  # ties
    assert streaming_heads(gates, 0.9, 0.5).tolist() == [[False, True], [True, False]]  # the threshold decides


def test_retrieval_heads_keep_everything_and_streaming_heads_their_sinks_and_recent_tokens(tokenizer):
    ids = prompt_ids(tokenizer)
    n = len(ids)
    generation = Engine(tiny_model(), build_method("duo_attention", {"patterns": DUO_PATTERN})).generate(
        ids, NEW_TOKENS, keep_session=True)
    generated = list(range(n, n + NEW_TOKENS - 1))
    streaming = list(range(16)) + list(range(n - 64, n)) + generated  # config.json: sink 16, recent 64
    everything = list(range(n)) + generated
    expected = [[everything, streaming], [streaming, everything]]  # gates [[0.9, 0.1], [0.3, 0.7]], ratio 0.5
    layers = generation.session.cache.layers  # per-head lengths, decoded laid out dense: padding at position -1
    held = [[[p for p in layer.positions[0, h].tolist() if p >= 0] for h in range(layer.num_heads)] for layer in layers]
    assert all(layer.padded for layer in layers) and held == expected
    assert generation.kept_tokens == (2 * n + 2 * 80) / 4


def test_streaming_heads_are_cut_after_every_prompt_chunk(tokenizer):
    ids = prompt_ids(tokenizer)
    method = build_method("duo_attention", {"patterns": DUO_PATTERN, "prefill_chunk": 100})
    generation = Engine(tiny_model(), method).generate(ids, 1, keep_session=True, trace=True)
    # the second chunk's attention: the retrieval head read 200 entries, the streaming head 16 + 64 + 100
    assert [len(head[0, 0]) for head in generation.trace[1][0]] == [200, 180]
    assert [head.length for head in generation.session.cache.layers[0].heads] == [len(ids), 80]


def _kvpress_on_the_fly_scores(model, ids: list[int], positions: int = 500) -> torch.Tensor:
    """kvpress's `duo_attention_on_the_fly` on one text, from the model's own modules: each layer's input
    normalised, projected, averaged over the tokens, repeated at `positions` positions with the model's RoPE; the last
    query's attention; the mean of its cumulative sum, averaged over the GQA group. `[L, H_kv]`."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    hidden_states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1]
    scores = []
    for layer, hidden in zip(model.model.layers, hidden_states):
        attention, d = layer.self_attn, layer.self_attn.head_dim
        hidden = layer.input_layernorm(hidden)
        q = attention.q_proj(hidden).view(1, len(ids), -1, d).mean(dim=1, keepdim=True)
        k = attention.k_proj(hidden).view(1, len(ids), -1, d).mean(dim=1, keepdim=True)
        q, k = q.repeat(1, positions, 1, 1).transpose(1, 2), k.repeat(1, positions, 1, 1).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(positions)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        weights = (q[:, :, -1:] @ k.repeat_interleave(groups, dim=1).transpose(2, 3) / d**0.5).softmax(dim=-1)
        scores.append(weights.squeeze().cumsum(dim=1).mean(dim=1).view(-1, groups).mean(dim=1))
    return torch.stack(scores)


@torch.no_grad()
def test_on_the_fly_scores_are_kvpress_scores_of_the_prompt(tokenizer):
    ids = prompt_ids(tokenizer)
    expected = _kvpress_on_the_fly_scores(build_random_model("tiny-qwen2", torch.float32, torch.device("cpu"), 0), ids)
    scores = {}
    for chunk in (None, 200):  # chunked prefill sums the queries chunk by chunk: the same scores
        method = build_method("duo_attention", {"prefill_chunk": chunk})
        session = Engine(tiny_model("tiny-qwen2"), method).generate(ids, 1, keep_session=True).session
        scores[chunk] = torch.stack([session.sample.state["duo_scores"][layer] for layer in range(2)])
        torch.testing.assert_close(scores[chunk], expected, atol=1e-5, rtol=0)
    assert (scores[None].max() - scores[None].min()) > 1e-3  # heads differ: the ranking is not decided by ties


def test_on_the_fly_heads_are_cut_before_the_first_step_after_the_prompt(tokenizer):
    ids = prompt_ids(tokenizer)
    method = build_method("duo_attention", {"sink_size": 16, "recent_size": 64})
    generation = Engine(tiny_model(), method).generate(ids, NEW_TOKENS, trace=True, keep_session=True)
    full = Engine(tiny_model(), build_method("full", {})).generate(ids, NEW_TOKENS)
    assert all(len(head[0, 0]) == len(ids) for head in generation.trace[0][0].split(1, dim=1))  # the prompt: uncut
    lengths = sorted(len(head[0, 0]) for layer in generation.trace[1] for head in layer)
    assert lengths == [81, 81, len(ids) + 1, len(ids) + 1]  # two of four KV heads stream, from the first step on
    assert generation.token_ids[0] == full.token_ids[0]  # the first token comes from the whole prompt


def test_duo_attention_ignores_budgets_takes_ratios_as_head_ratios_and_names_its_split(tokenizer):
    ids = prompt_ids(tokenizer)

    def kept(options):
        method = build_method("duo_attention", {"patterns": DUO_PATTERN, **options})
        return Engine(tiny_model(), method).generate(ids, 1).kept_tokens

    assert kept({}) == kept({"budget": 64}) < len(ids)  # a sweep's budget changes nothing
    # kvpress's evaluation sets head_compression_ratio from compression_ratio: a ratio sweep sweeps the head split
    assert kept({"compression_ratio": 0.75}) == kept({"head_compression_ratio": 0.75}) < kept({}) < kept(
        {"compression_ratio": 0.25}) == kept({"head_compression_ratio": 0.25})
    assert build_method("duo_attention", {"compression_ratio": 0.75}).head_compression_ratio == 0.75
    assert build_method("duo_attention", {"compression_ratio": 0.75}).describe() == "duo_attention_r0.75"
    # the run label names the ratio once, whatever the ratio (the head ratio it sets is not an option of its own)
    assert method_label(build_method("duo_attention", {"compression_ratio": 0.875})) == "duo_attention_r0.875"
    assert method_label(build_method("duo_attention", {"head_compression_ratio": 0.875})) == (
        "duo_attention_h0.875-head_compression_ratio=0.875")
    # tables read the swept ratio as the run's budget column (the leaderboard view's compression_ratio)
    assert build_method("duo_attention", {"compression_ratio": 0.875}).budget_label() == "r0.875"
    assert build_method("duo_attention", {"head_compression_ratio": 0.875}).budget_label() is None
    thresholded = build_method("duo_attention", {"patterns": DUO_PATTERN, "threshold": 0.5, "compression_ratio": 0.75})
    assert thresholded.head_compression_ratio == 0.5 and thresholded.describe() == "duo_attention_t0.5"
    with pytest.raises(EvalkvError, match="head_compression_ratio must be in"):
        build_method("duo_attention", {"head_compression_ratio": 1.5})
    assert build_method("duo_attention", {}).describe() == "duo_attention_h0.5"
    assert build_method("duo_attention", {"patterns": DUO_PATTERN, "threshold": 0.5}).describe() == "duo_attention_t0.5"
    assert build_method("duo_attention", {}).sizes() == (128, 256)  # kvpress's on-the-fly sizes
