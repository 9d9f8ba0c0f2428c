"""LAQ (Lookahead Q-Cache): after `lookahead_steps` generated tokens, the prompt is cut to the budget by SnapKV's
scores of the last prompt queries together with the generated tokens' queries."""

from __future__ import annotations

import pytest
import torch
from single_layer import SCALING, SingleLayer

from evalkv.errors import EvalkvError
from evalkv.kv.view import Phase
from evalkv.methods import build_method


def snap_scores(rows, row_positions, keys, key_positions, candidates: int, kernel: int = 7) -> torch.Tensor:
    """One KV head's SnapKV score in fp64: rows `[G, r, d]` (its query heads) attend over keys `[m, d]` at their true
    positions (later keys masked), summed over the rows, averaged over the heads, max-pooled over the first
    `candidates` entries."""
    logits = rows.double() @ keys.double().T * SCALING
    future = key_positions[None, :] > row_positions[:, None]
    sums = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).sum(dim=-2).mean(dim=0)[:candidates]
    return torch.nn.functional.max_pool1d(sums[None, None], kernel, 1, kernel // 2)[0, 0]


def best(scores: torch.Tensor, k: int) -> list[int]:
    return scores.argsort(descending=True, stable=True)[:k].sort().values.tolist()


def test_the_prompt_is_cut_after_the_lookahead_steps_by_their_queries_and_the_last_prompt_queries():
    n, budget, window, steps = 40, 12, 4, 3
    layer = SingleLayer(build_method("laq", {"budget": budget, "window_size": window, "lookahead_steps": steps}), n,
                        seed=9)
    prompt = layer.prompt()
    assert layer.cache.length == n  # the lookahead steps attend to the whole prompt
    decodes = [layer.decode() for _ in range(steps)]
    assert [d.keys.shape[2] for d in decodes] == [n + 1, n + 2, n + 3]
    rows = torch.cat([prompt.query[0, :, -window:]] + [d.query[0] for d in decodes], dim=1)  # [H, 7, d]
    row_positions = torch.arange(n - window, n + steps)
    kept = []
    for head in range(2):
        scores = snap_scores(rows[2 * head : 2 * head + 2], row_positions, prompt.appended_keys[0, head],
                             torch.arange(n), n - window)
        kept.append(best(scores, budget - window) + list(range(n - window, n + steps)))
    assert layer.cache.positions[0].tolist() == kept
    assert kept[0] != kept[1]
    layer.decode()
    assert layer.cache.length == budget + steps + 1  # later steps append


def test_with_a_lookahead_budget_the_lookahead_cache_is_snapkv_and_stage_two_picks_among_its_survivors():
    n, budget, window, steps, lookahead = 40, 12, 4, 2, 24
    method = build_method("laq", {"budget": budget, "window_size": window, "lookahead_steps": steps,
                                  "lookahead_budget": lookahead, "lookahead_window": 8})
    layer = SingleLayer(method, n, seed=10)
    prompt = layer.prompt()
    survivors = []
    for head in range(2):
        scores = snap_scores(prompt.query[0, 2 * head : 2 * head + 2, -8:], torch.arange(n - 8, n),
                             prompt.appended_keys[0, head], torch.arange(n), n - 8)
        survivors.append(best(scores, lookahead - 8) + list(range(n - 8, n)))
    assert layer.cache.positions[0].tolist() == survivors
    decodes = [layer.decode() for _ in range(steps)]
    rows = torch.cat([prompt.query[0, :, -window:]] + [d.query[0] for d in decodes], dim=1)
    row_positions = torch.arange(n - window, n + steps)
    for head in range(2):
        positions = torch.tensor(survivors[head])
        candidates = int((positions < n - window).sum())
        keys = decodes[-1].appended_keys[0, head, :lookahead]  # the survivors (the generated entries follow them)
        scores = snap_scores(rows[2 * head : 2 * head + 2], row_positions, keys, positions, candidates)
        expected = [survivors[head][i] for i in best(scores, budget - window)] + list(range(n - window, n + steps))
        assert layer.cache.positions[0, head].tolist() == expected


def test_a_short_prompt_or_answer_is_never_cut():
    layer = SingleLayer(build_method("laq", {"budget": 48, "lookahead_steps": 2}), 40)
    layer.prompt()
    for _ in range(4):
        layer.decode()
    assert layer.cache.positions[0, 0].tolist() == list(range(44))
    layer = SingleLayer(build_method("laq", {"budget": 12, "lookahead_steps": 5}), 40)
    layer.prompt()
    for _ in range(4):
        layer.decode()
    assert layer.cache.length == 44


def test_a_question_fed_after_the_prompt_observes_and_stays():
    """A query-agnostic run's question: its last queries are the observation rows, the whole prompt competes, and
    the question's entries stay with the generated ones."""
    n, budget, window = 30, 10, 4
    layer = SingleLayer(build_method("laq", {"budget": budget, "window_size": window, "lookahead_steps": 2}), n,
                        seed=11)
    prompt = layer.prompt()
    question = layer.random(6, Phase.SUFFIX)
    decodes = [layer.decode() for _ in range(2)]
    rows = torch.cat([question.query[0, :, -window:]] + [d.query[0] for d in decodes], dim=1)
    row_positions = torch.tensor([32, 33, 34, 35, 36, 37])
    kept = []
    for head in range(2):
        scores = snap_scores(rows[2 * head : 2 * head + 2], row_positions, question.appended_keys[0, head],
                             torch.arange(n + 6), n)
        kept.append(best(scores, budget) + list(range(n, n + 8)))
    assert prompt.appended_keys.shape[2] == n and layer.cache.positions[0].tolist() == kept


def test_options_are_checked():
    with pytest.raises(EvalkvError, match="lookahead_window >= window_size"):
        build_method("laq", {"budget": 64, "window_size": 40})
    with pytest.raises(EvalkvError, match="must exceed window_size"):
        build_method("laq", {"budget": 8, "window_size": 8})
    with pytest.raises(EvalkvError, match="must exceed lookahead_window"):
        build_method("laq", {"budget": 64, "lookahead_budget": 32})
