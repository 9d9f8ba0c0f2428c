"""SegKV-CF `segment_two_stage` (docs/methods.md#segment_two_stage): separators, segments, coarse and fine cuts."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import SingleLayer, eager_probs

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.segment_two_stage import (
    CODE_SEPARATOR,
    QA_SEPARATOR,
    segment_bounds,
    segment_mean_scores,
    separator_ids,
)


class _HandMadeTokenizer:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(len(self.tokens))}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tokens[i] for i in ids)


def test_separator_patterns_on_a_hand_made_vocab():
    qa = [".", "!", "?", "\n", "\r\n", '."', ".)", "...", "?!", "\n\n", ".']"]
    code = [";", ":", " ;", ")\n", "};", '" :', "\n ", ";;"]
    neither = [" .", "a.", ")", '"', '")', "%", "a;", ";a", " ", "word", "<|eos|>", ". a"]
    for text in qa:
        assert QA_SEPARATOR.match(text), text
    for text in code:
        assert CODE_SEPARATOR.match(text) and not QA_SEPARATOR.match(text), text
    for text in neither:
        assert not QA_SEPARATOR.match(text) and not CODE_SEPARATOR.match(text), text
    tokenizer = _HandMadeTokenizer(qa + code + neither)
    qa_ids, code_ids = separator_ids(tokenizer)
    newline_ids = [i for i, t in enumerate(tokenizer.tokens) if t in ("\n", "\n\n")]  # "\n" is in both sets
    assert qa_ids == list(range(len(qa)))
    assert code_ids == sorted(newline_ids + list(range(len(qa), len(qa) + len(code))))
    assert separator_ids(tokenizer) is separator_ids(tokenizer)  # computed once per tokenizer


def test_the_set_whose_positions_sum_higher_wins_not_the_larger_count():
    qa_id, code_id = 1, 2
    ids = torch.tensor([qa_id, qa_id, qa_id, 0, 0, 0, 0, 0, code_id, 0, 0, 0])  # QA at 0,1,2 (sum 3), code at 8
    assert segment_bounds(ids, [qa_id], [code_id], prefix_length=10).tolist() == [0, 9, 10]
    ids[8] = 0
    assert segment_bounds(ids, [qa_id], [code_id], prefix_length=10).tolist() == [0, 1, 2, 3, 10]


def test_segment_bounds_put_each_separator_in_the_segment_it_ends():
    ids = torch.tensor([0, 0, 5, 0, 0, 5, 0, 0, 0, 5, 0, 5, 0])
    assert segment_bounds(ids, [5], [], prefix_length=10).tolist() == [0, 3, 6, 10]  # 9 + 1 = 10 not repeated
    assert segment_bounds(ids, [5], [], prefix_length=8).tolist() == [0, 3, 6, 8]
    assert segment_bounds(torch.zeros(12, dtype=torch.long), [5], [6], prefix_length=10).tolist() == [0, 10]


def test_segment_scores_are_means_over_the_tokens_present():
    scores = torch.tensor([[[1.0, 3.0, 8.0, 0.0, 4.0]]])
    segments = torch.tensor([[[0, 0, 1, 2, 2]]])
    means = segment_mean_scores(scores, segments, 4)  # any count above the largest index, as the bounds give
    torch.testing.assert_close(means, torch.tensor([[[2.0, 2.0, 8.0, 2.0, 2.0]]]), rtol=1e-5, atol=0)


def _segments_of(positions: list[int], bounds: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for position in positions:
        segment = sum(1 for b in bounds[1:] if b <= position)
        counts[segment] = counts.get(segment, 0) + 1
    return counts


def _run(options: dict, tokenizer, new_tokens: int, architecture: str = "tiny-llama"):
    ids = prompt_ids(tokenizer)
    method = build_method("segment_two_stage", options)
    generation = Engine(tiny_model(architecture), method, tokenizer=tokenizer).generate(
        ids, new_tokens, trace=True, keep_session=True)
    return ids, generation


def test_coarse_stage_keeps_whole_segments_and_the_window(tokenizer):
    ids, generation = _run({"budget": 64, "window_size": 8, "coarse_budget": 200}, tokenizer, new_tokens=2)
    n = len(ids)
    dots = [i for i, t in enumerate(ids) if tokenizer.decode([t]) == "."]
    bounds = [0] + [p + 1 for p in dots if p < n - 8] + [n - 8]
    first_decode = generation.trace[1][0]  # layer 0 after the coarse cut, + the fed token
    assert first_decode.shape == (1, 4, 200 + 1)  # one selection per query head
    for head in range(4):
        kept = first_decode[0, head].tolist()
        assert kept[-9:] == list(range(n - 8, n + 1))
        counts = _segments_of(kept[:-9], bounds)
        sizes = {s: bounds[s + 1] - bounds[s] for s in counts}
        assert sum(1 for s in counts if counts[s] < sizes[s]) <= 1  # at most one partial segment
    assert not torch.equal(first_decode[0, 0], first_decode[0, 1])


def test_fine_stage_cuts_to_exactly_the_budget_before_step_lookahead_then_grows(tokenizer):
    ids, generation = _run({"budget": 64, "window_size": 8, "coarse_budget": 200, "lookahead_steps": 2},
                           tokenizer, new_tokens=6)
    n = len(ids)
    lengths = [generation.trace[f][0].shape[-1] for f in range(1, 6)]
    assert lengths == [201, 64, 65, 66, 67]
    cut = generation.trace[2]  # decode step 2 attended to the refined cache
    for layer_positions in cut:
        assert (layer_positions[0, :, -10:] == torch.arange(n - 8, n + 2)).all()  # window + 2 generated
    assert generation.session.cache.lengths() == [64 + 3, 64 + 3]


def _segment_ranking(token_scores, positions, bounds, keep):
    """Brute force: per head, the `keep` candidates of the segments with the best mean score (ties: position)."""
    segments = torch.searchsorted(bounds, positions.contiguous(), right=True) - 1
    kept = []
    for head in range(token_scores.shape[0]):
        sums = torch.zeros(len(bounds) - 1, dtype=torch.float64).index_add(0, segments[head], token_scores[head])
        means = sums / torch.bincount(segments[head], minlength=len(bounds) - 1).clamp_min(1).double()
        order = sorted(range(positions.shape[-1]), key=lambda j: (-float(means[segments[head, j]]), j))[:keep]
        kept.append(positions[head, sorted(order)].tolist())
    return kept


def test_fine_stage_keeps_the_best_segments_of_the_survivors():
    """Segment means of the mean attention that the last 32 prompt queries and the 2 lookahead queries give to the
    stage-1 survivors, per query head, computed by brute force over the cache before the cut."""
    input_ids = torch.zeros(1, 120, dtype=torch.long)
    input_ids[0, 9::10] = 1  # a separator every 10 tokens
    method = build_method("segment_two_stage", {"budget": 30, "window_size": 4, "coarse_budget": 60,
                                                "lookahead_steps": 2})
    method.prepare(_HandMadeTokenizer(["x", "."]))
    layer = SingleLayer(method, prompt_length=120, input_ids=input_ids, seed=4)
    prompt, first, second = layer.prompt(), layer.decode(), layer.decode()
    assert first.positions.shape == (1, 4, 61) and second.positions.shape == (1, 4, 30)
    rows = torch.cat([prompt.query[:, :, -32:], first.query, second.query], dim=-2).double()
    row_positions = torch.arange(88, 122)
    keys, positions = second.appended_keys.double(), second.appended_positions  # [1, 4, 62, d], [1, 4, 62]
    logits = rows @ keys.transpose(-1, -2) * layer.scaling
    logits = logits.masked_fill(positions[:, :, None, :] > row_positions[:, None], float("-inf"))
    token_scores = torch.softmax(logits, dim=-1)[0, :, :, :56].mean(dim=1)  # the 56 stage-1 survivors
    bounds = torch.tensor(list(range(0, 116, 10)) + [116])
    expected = _segment_ranking(token_scores, positions[0, :, :56], bounds, keep=30 - 6)
    for head in range(4):
        assert second.positions[0, head].tolist() == expected[head] + [116, 117, 118, 119, 120, 121]


def test_coarse_stage_ranking_equals_brute_force():
    input_ids = torch.zeros(1, 100, dtype=torch.long)
    input_ids[0, 6::7] = 1
    method = build_method("segment_two_stage", {"budget": 30, "window_size": 4, "coarse_budget": 40})
    method.prepare(_HandMadeTokenizer(["x", "."]))
    layer = SingleLayer(method, prompt_length=100, input_ids=input_ids, seed=6)
    prompt = layer.prompt()
    token_scores = eager_probs(prompt.query[:, :, -4:], prompt.keys, layer.scaling)[0, :, :, :96].mean(dim=1)
    bounds = torch.tensor([0] + list(range(7, 96, 7)) + [96])
    expected = _segment_ranking(token_scores, torch.arange(96).expand(4, 96), bounds, keep=36)
    assert layer.cache.positions[0].tolist() == [kept + [96, 97, 98, 99] for kept in expected]


def test_short_prompt_skips_the_coarse_stage_and_small_cache_skips_the_fine_stage(tokenizer):
    ids, generation = _run({"budget": 64, "window_size": 8}, tokenizer, new_tokens=4)  # coarse 2048 > n
    assert generation.trace[1][0].shape[-1] == len(ids) + 1
    assert generation.trace[2][0].shape[-1] == 64
    ids, generation = _run({"budget": len(ids) + 2, "window_size": 8, "coarse_budget": 200}, tokenizer,
                           new_tokens=5)
    assert [generation.trace[f][0].shape[-1] for f in range(5)] == [len(ids) + f for f in range(5)]


def test_kv_head_granularity_and_lookahead_only_queries(tokenizer):
    options = {"budget": 64, "window_size": 8, "coarse_budget": 200, "granularity": "kv_head",
               "stage2_queries": "lookahead", "lookahead_steps": 3}
    ids, generation = _run(options, tokenizer, new_tokens=5)
    assert [generation.trace[f][0].shape for f in range(1, 5)] == [(1, 2, 201), (1, 2, 202), (1, 2, 64),
                                                                    (1, 2, 65)]


def test_budget_is_the_seed_max_capacity():
    assert build_method("segment_two_stage", {}).budget == 128
    assert build_method("segment_two_stage", {"max_capacity": 256}).budget == 256
    assert build_method("segment_two_stage", {"compression_ratio": 0.5}).budget is None
    with pytest.raises(EvalkvError, match="differ"):
        build_method("segment_two_stage", {"budget": 64, "max_capacity": 128})
    with pytest.raises(EvalkvError, match="must exceed window_size"):
        build_method("segment_two_stage", {"budget": 34})


def test_without_a_tokenizer_the_method_says_what_it_needs(tokenizer):
    method = build_method("segment_two_stage", {"budget": 64, "window_size": 8})
    with pytest.raises(EvalkvError, match="needs the model's tokenizer"):
        Engine(tiny_model(), method).generate(prompt_ids(tokenizer), 2)
