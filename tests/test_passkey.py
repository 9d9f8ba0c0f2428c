"""The passkey task (specs/benchmarks.md §C.3) and its metric."""

from __future__ import annotations

import pytest
from conftest import tiny_loaded

from evalkv.errors import EvalkvError
from evalkv.metrics.passkey import passkey_correct
from evalkv.tasks import build_task
from evalkv.tasks.passkey import FINAL_QUESTION, GARBAGE, TASK_DESCRIPTION, passkey_prompt


def test_prompt_follows_the_landmark_layout():
    prompt = passkey_prompt(200, 25, 12345)
    lines = prompt.split("\n")
    assert lines[0] == TASK_DESCRIPTION and lines[-1] == FINAL_QUESTION
    assert lines[2] == "The pass key is 12345. Remember it. 12345 is the pass key."
    assert len(lines[1]) == 50 and len(lines[3]) == 150  # depth 25% of 200 filler characters before the key
    assert lines[1] == (" ".join([GARBAGE] * 3))[:50] and lines[3] == (" ".join([GARBAGE] * 3))[:150]


def test_samples_fit_their_lengths_and_spread_depths():
    model = tiny_loaded()
    task = build_task("passkey", {"lengths": [300, 600], "depths": [0, 50, 100], "samples_per_cell": 2})
    samples = list(task.samples(model))
    assert len(samples) == task.size() == 12
    assert len({s.id for s in samples}) == 12
    for sample in samples:
        length = sample.metadata["context_length"]
        assert length - 2 <= len(sample.prompt_ids) <= length  # the most filler that fits (byte tokens)
        text = model.decode(sample.prompt_ids)
        key = sample.answers[0]
        assert f"The pass key is {key}." in text
        before = text.index("The pass key is")
        depth = sample.metadata["depth"]
        filler = len(text) - len(TASK_DESCRIPTION) - len(FINAL_QUESTION) - len(text.split("\n")[2]) - 4
        assert abs((before - len(TASK_DESCRIPTION) - 1) - filler * depth / 100) <= 1
    keys = [s.answers[0] for s in samples]
    assert len(set(keys)) > 6 and all(1 <= int(k) <= 50000 for k in keys)


def test_samples_are_deterministic():
    model = tiny_loaded()
    first = [s.prompt_ids for s in build_task("passkey", {"lengths": [256]}).samples(model)]
    second = [s.prompt_ids for s in build_task("passkey", {"lengths": [256]}).samples(model)]
    assert first == second


@pytest.mark.parametrize("options,message", [({"lengths": [10]}, "lengths"), ({"depths": [150]}, "depths"),
                                             ({"n_samples": 0}, "n_samples")])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_task("passkey", options)


@pytest.mark.parametrize("prediction,expected", [(" 12345. Remember it.", 1.0), ("The key is 12345", 1.0),
                                                 ("123456", 0.0), ("no digits", 0.0), ("0012345", 1.0),
                                                 ("54321 then 12345", 0.0)])
def test_first_integer_must_equal_the_key(prediction, expected):
    assert passkey_correct(prediction, "12345") == expected
