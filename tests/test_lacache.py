"""LaCache (docs/methods.md#lacache): the ladder's index arithmetic on the worked examples there, iterative
compaction (startover), and the cache it leaves in a real run."""

from __future__ import annotations

import pytest
from conftest import prompt_ids, tiny_model

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.lacache import Ladder


def _ladder_part(kept: list[int], start: int, stop: int) -> list[int]:
    return [i - start for i in kept if start <= i < stop]


def test_span_16_on_32_layers_even_layers_keep_even_tokens_odd_layers_odd():
    ladder = Ladder(num_layers=32, span=16, overlap=0, cache_size=100, start_size=4)
    assert (ladder.before, ladder.after, ladder.can_reduce) == (2, 1, 1)
    kept = ladder.compact(110)  # 10 to drop: 10 groups of 2 from the cursor (4)
    for layer, indices in enumerate(kept):
        assert indices[:4] == [0, 1, 2, 3] and indices[-86:] == list(range(24, 110))
        assert _ladder_part(indices, 4, 24) == list(range(layer % 2, 20, 2))
    assert ladder.cursor == 14 and {len(k) for k in kept} == {100}
    assert sum(1 for indices in kept if 4 in indices) == 16  # each laddered token lives in `span` layers


def test_span_8_groups_of_4_one_token_per_layer():
    ladder = Ladder(num_layers=32, span=8, overlap=0, cache_size=100, start_size=4)
    assert (ladder.before, ladder.after) == (4, 1)
    kept = ladder.compact(120)  # size compensated once to 101: 19 to drop -> 7 groups of 4
    assert ladder.cache_size == 101
    for layer, indices in enumerate(kept):
        assert _ladder_part(indices, 4, 32) == [layer % 4 + 4 * g for g in range(7)]
        assert len(indices) == 120 - 21
    assert ladder.cursor == 11


def test_span_8_overlap_4_groups_of_7_two_consecutive_tokens_per_layer():
    ladder = Ladder(num_layers=32, span=8, overlap=4, cache_size=100, start_size=4)
    assert (ladder.before, ladder.after, ladder.can_reduce) == (7, 2, 5)
    kept = ladder.compact(120)  # compensated to 102: 18 to drop -> 4 groups of 7, 2 kept per layer
    for layer, indices in enumerate(kept):
        offset = layer % 6
        assert _ladder_part(indices, 4, 32) == [offset + 7 * g + k for g in range(4) for k in range(2)]
        assert len(indices) == 100
    assert ladder.cursor == 12


def test_no_compaction_at_or_below_the_cache_size():
    ladder = Ladder(num_layers=32, span=16, overlap=0, cache_size=100, start_size=4)
    assert ladder.compact(100) is None and ladder.cursor == 4


def test_startover_recompacts_the_ladder_region_with_wider_groups():
    ladder = Ladder(num_layers=2, span=1, overlap=0, cache_size=20, start_size=2)
    kept = ladder.compact(40)  # room for 16 reductions, 20 needed: one startover
    assert kept == [
        [0, 1, 2, 6, 10, 14, 18, 20, 22, 24, 26, 28, 30, 32, 34, 35, 36, 37, 38, 39],
        [0, 1, 5, 9, 13, 17, 19, 21, 23, 25, 27, 29, 31, 33, 34, 35, 36, 37, 38, 39],
    ]
    assert ladder.cursor == 6
    assert ladder.compact(21) == [[*range(6), 6, *range(8, 21)], [*range(6), 7, *range(8, 21)]]
    assert ladder.cursor == 7


def test_repeated_startovers_make_older_tokens_thinner():
    ladder = Ladder(num_layers=2, span=1, overlap=0, cache_size=20, start_size=2)
    kept = ladder.compact(60)  # two widenings: groups of 3 in the first-pass list
    assert kept[0] == [0, 1, 2, 8, 14, 20, 26, 32, 36, 39, 42, 45, 48, 51, 54, 55, 56, 57, 58, 59]
    gaps = [b - a for a, b in zip(kept[0][2:9], kept[0][3:10])]
    assert gaps == [6, 6, 6, 6, 6, 4, 3]  # oldest thinnest
    assert ladder.cursor == 14


def test_reference_quirk_a_rung_can_repeat_the_first_recent_token():
    """With after >= 2 and two widenings, the reference's last rung of some layers lands on the first recent token,
    which that layer then holds twice (reproduced exactly; see the LaCache docstring)."""
    ladder = Ladder(num_layers=6, span=3, overlap=1, cache_size=20, start_size=4)
    kept = ladder.compact(33)
    assert kept[3] == [0, 1, 2, 3, 9, 12, 17, 19, 22, 24, 24, 25, 26, 27, 28, 29, 30, 31, 32]
    assert {len(indices) for indices in kept} == {19}


@pytest.mark.parametrize("options,message", [
    ({"num_layers": 32, "span": 32, "overlap": 0}, "saves nothing"),
    ({"num_layers": 32, "span": 8, "overlap": 8}, "overlap < span"),
    ({"num_layers": 32, "span": 16, "overlap": 0, "cache_size": 36, "start_size": 4}, "no ladder room"),
])
def test_bad_geometry_is_an_error(options, message):
    with pytest.raises(EvalkvError, match=message):
        Ladder(**{"cache_size": 100, "start_size": 4, **options})


def test_each_layer_keeps_its_own_tokens_at_one_length_every_step(tokenizer):
    ids = prompt_ids(tokenizer)
    method = build_method("lacache", {"budget": 64, "span": 1, "start_size": 4})
    generation = Engine(tiny_model(), method).generate(ids, 8, trace=True, keep_session=True)
    for forward in range(1, 8):
        current = len(ids) + forward - 1
        first, second = (layer[0, 0].tolist() for layer in generation.trace[forward])
        assert len(first) == len(second) <= 64 + 1
        assert first[:4] == second[:4] == [0, 1, 2, 3]
        assert first[-1] == second[-1] == current and first[-2] == second[-2] == current - 1
        assert first != second
        for layer in generation.trace[forward]:  # one set for all heads of a layer
            assert (layer == layer[:, :1]).all()
    lengths = generation.session.cache.lengths()
    assert lengths[0] == lengths[1] <= 64


def test_start_tokens_follow_the_longbench_driver(tokenizer):
    ids = prompt_ids(tokenizer)
    method = build_method("lacache", {"budget": 64, "span": 1})  # start = min(128, n - 3, 64 - 3) = 61
    generation = Engine(tiny_model(), method).generate(ids, 2, keep_session=True)
    assert generation.session.sample.state["lacache_ladder"].start_size == 61
    positions = generation.session.cache.layers[0].positions[0, 0]
    assert positions[:61].tolist() == list(range(61))


def test_span_not_below_the_layer_count_is_an_error(tokenizer):
    method = build_method("lacache", {"budget": 64})  # span 16 on a 2-layer model
    with pytest.raises(EvalkvError, match="saves nothing"):
        Engine(tiny_model(), method).generate(prompt_ids(tokenizer), 2)
