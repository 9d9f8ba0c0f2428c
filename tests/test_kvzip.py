"""KVzip (docs/methods.md#kvzip): the repeat inputs, the reconstruction score against a brute-force softmax, the
selection across layers and heads, and the method's side of the engine's prompt replay (Method.rescore_prompt)."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import GEOMETRY, SCALING

from evalkv.errors import EvalkvError
from evalkv.kv.cache import LayerCache
from evalkv.kv.engine import Engine
from evalkv.kv.view import AttentionView, ModelGeometry, SampleState
from evalkv.methods import build_method
from evalkv.methods.kvzip import chat_suffix, keep_most_reconstructive, reconstruction_scores, repeat_inputs
from evalkv.models.presets import byte_tokenizer


def test_repeat_inputs_quote_the_end_of_the_previous_chunk():
    prompt = torch.arange(100, 110)
    first, following, suffix = torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([9])
    chunks = [(start, end, ids.tolist()) for start, end, ids in repeat_inputs(prompt, 4, first, following, suffix)]
    assert chunks == [
        (0, 4, [1, 2, 9, 100, 101, 102, 103]),
        (4, 8, [3, 100, 101, 102, 103, 9, 104, 105, 106, 107]),  # the previous chunk's last 8 (all 4) tokens
        (8, 10, [3, 104, 105, 106, 107, 9, 108, 109]),
    ]
    long = repeat_inputs(torch.arange(20), 10, first, following, suffix)[1][2].tolist()
    assert long == [3, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # 8 quoted tokens


def test_chat_suffix_is_what_follows_a_user_message():
    tokenizer = byte_tokenizer()
    assert chat_suffix(tokenizer) == "<|end|>\n<|assistant|>\n"  # the byte tokenizer's template
    tokenizer.chat_template = None
    assert chat_suffix(tokenizer) == "\n"


def _replay_view(prompt_length: int, replayed: int, seed: int = 0) -> AttentionView:
    """One layer after a replay forward: the prompt's entries then the `replayed` tokens', random, at true positions."""
    generator = torch.Generator().manual_seed(seed)
    length = prompt_length + replayed
    keys = torch.randn(1, 2, length, 8, generator=generator)
    cache = LayerCache(keys, torch.randn(1, 2, length, 8, generator=generator),
                       torch.arange(length).expand(1, 2, length).contiguous())
    query = torch.randn(1, 4, replayed, 8, generator=generator) * 3
    sample = SampleState(input_ids=torch.zeros(1, prompt_length, dtype=torch.long), prompt_length=prompt_length)
    return AttentionView(layer_idx=0, geometry=GEOMETRY, sample=sample, query=query,
                         query_positions=torch.arange(prompt_length, length)[None], scaling=SCALING, cache=cache,
                         state={})


def test_reconstruction_scores_are_the_largest_attention_over_sinks_chunk_and_replay():
    view = _replay_view(prompt_length=30, replayed=12)
    scores = reconstruction_scores(view, start=10, end=20, sink=4)
    # brute force in fp64: the softmax over the 4 sinks, the chunk and the replayed tokens (causal among those)
    entries = list(range(4)) + list(range(10, 20)) + list(range(30, 42))
    keys = view.keys.double()[:, :, entries].repeat_interleave(2, dim=1)
    logits = view.query.double() @ keys.transpose(-1, -2) * SCALING
    causal = torch.ones(12, len(entries), dtype=torch.bool)
    causal[:, 14:] = torch.ones(12, 12, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)[..., 4:14]
    expected = probs.amax(dim=2).reshape(1, 2, 2, 10).amax(dim=2)
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=0)
    assert scores.shape == (1, 2, 10)


def test_the_most_reconstructive_entries_are_chosen_across_layers_and_heads():
    scores = torch.rand(3, 2, 10, generator=torch.Generator().manual_seed(0))
    keeps = keep_most_reconstructive(scores, capacity=4, n_sink=2, layerwise=False)
    ranked = scores.clone()
    ranked[..., :2] = float("inf")
    threshold = ranked.flatten().sort(descending=True).values[3 * 2 * 4 - 1]
    chosen = [[(ranked[layer, head] >= threshold).nonzero().flatten().tolist() for head in range(2)]
              for layer in range(3)]
    kept = [[head.tolist() for head in keep] if isinstance(keep, list) else keep[0].tolist() for keep in keeps]
    assert kept == chosen and sum(len(head) for layer in kept for head in layer) == 24
    assert all(head[:2] == [0, 1] for layer in kept for head in layer)  # sinks in every head
    assert len({len(head) for layer in kept for head in layer}) > 1  # heads and layers keep different numbers


def test_layerwise_selection_shares_the_budget_within_each_layer():
    scores = torch.rand(3, 2, 10, generator=torch.Generator().manual_seed(1))
    for layer, keep in enumerate(keep_most_reconstructive(scores, capacity=4, n_sink=0, layerwise=True)):
        heads = keep if isinstance(keep, list) else list(keep[0])
        threshold = scores[layer].flatten().sort(descending=True).values[7]
        assert [head.tolist() for head in heads] == [
            (scores[layer, head] >= threshold).nonzero().flatten().tolist() for head in range(2)]


def test_equal_counts_keep_a_dense_layer_and_a_full_capacity_keeps_everything():
    scores = torch.tensor([[[0.9, 0.1, 0.8, 0.2], [0.1, 0.9, 0.2, 0.8]]])
    keep = keep_most_reconstructive(scores, capacity=2, n_sink=0, layerwise=False)[0]
    assert torch.equal(keep, torch.tensor([[[0, 2], [1, 3]]]))  # one [1, H_kv, k] tensor: no ragged layer
    assert keep_most_reconstructive(scores, capacity=4, n_sink=0, layerwise=False) == [None]


class _RecordingReplay:
    """A PromptReplay over one random layer: runs `score` on a view whose replayed entries are random."""

    def __init__(self, prompt_length: int):
        self.prompt_ids = torch.arange(prompt_length)[None] % 200
        self.geometry = ModelGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
        self.calls: list[list[int]] = []

    def run(self, ids, score):
        self.calls.append(ids[0].tolist())
        return [score(_replay_view(self.prompt_ids.shape[-1], ids.shape[-1], seed=len(self.calls)))]


def test_rescore_prompt_replays_every_chunk_then_keeps_the_budget():
    method = build_method("kvzip", {"budget": 20, "chunk_size": 16, "n_sink": 4})
    tokenizer = byte_tokenizer()
    method.prepare(tokenizer)
    replay = _RecordingReplay(prompt_length=40)
    keep = method.rescore_prompt(replay)
    prompt = replay.prompt_ids[0]
    expected = [ids.tolist() for _, _, ids in repeat_inputs(prompt, 16, *method._repeat)]
    assert replay.calls == expected and len(expected) == 3
    assert expected[0][: len("\n\nRepeat")] == tokenizer.encode("\n\nRepeat", add_special_tokens=False)
    heads = keep[0] if isinstance(keep[0], list) else list(keep[0][0])
    assert sum(len(head) for head in heads) == 2 * 20 and all(head[:4].tolist() == [0, 1, 2, 3] for head in heads)


def test_kvzip_end_to_end_keeps_the_budget_across_layers_and_heads(tokenizer):
    ids = prompt_ids(tokenizer)
    generation = Engine(tiny_model(), build_method("kvzip", {"budget": 64, "chunk_size": 200}),
                        tokenizer=tokenizer).generate(ids, 4, keep_session=True, trace=True)
    heads = []  # what each KV head keeps of the prompt (the 3 generated tokens appended after it left out)
    for layer in generation.session.cache.layers:
        positions = [head.positions[0, 0] for head in layer.heads] if layer.is_ragged else list(layer.positions[0])
        heads += [head[:-3].tolist() for head in positions]
    assert sum(len(head) for head in heads) == 4 * 64 and len({len(head) for head in heads}) > 1
    assert all(head[:4] == [0, 1, 2, 3] for head in heads)
    assert len(generation.trace) == 4  # the replay forwards are not steps of the sequence


def test_kvzip_options_are_checked():
    with pytest.raises(EvalkvError, match="smaller than n_sink"):
        build_method("kvzip", {"budget": 2})
    with pytest.raises(EvalkvError, match="chunk_size >= 1"):
        build_method("kvzip", {"budget": 64, "chunk_size": 0})
