"""task=needle (specs/benchmarks.md §C.1-C.2): gkamradt's insertion, both prompt forms, the two scores, the heatmap."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import tiny_loaded

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.metrics.needle import needle_recall, rouge1_x10
from evalkv.report.heatmap import DPI, figure_size
from evalkv.tasks import build_task
from evalkv.tasks.needle import ANSWER, GRIDS, NEEDLE, insert_needle

ESSAY = ("Some essay text. It goes on and on about startups. Then it ends. " * 40).strip()


@pytest.fixture
def haystack(tmp_path):
    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "b.txt").write_text(ESSAY[: len(ESSAY) // 2])
    (folder / "a.txt").write_text(ESSAY[len(ESSAY) // 2:])
    return folder


def test_insertion_backs_off_to_just_after_a_period():
    context = [1, 2, 0, 3, 4, 0, 5, 6, 7, 8]  # 0 is the period token
    assert insert_needle(context, [9, 9], 60, 14, 2, {0}) == [1, 2, 0, 3, 4, 0, 9, 9, 5, 6, 7, 8]
    assert insert_needle(context, [9], 100, 14, 2, {0}) == context + [9]
    assert insert_needle(context, [9], 80, 8, 2, {0}) == [1, 2, 0, 9, 3, 4]  # cut to length - buffer - needle
    assert insert_needle([1, 2, 3], [9], 50, 10, 0, {0}) == [9, 1, 2, 3]  # no period before: at the start


def test_default_grids_are_the_references():
    assert GRIDS["original"][0][:3] == [1000, 1441, 1882] and len(GRIDS["original"][0]) == 35
    assert len(GRIDS["original"][1]) == 35 and GRIDS["original"][1][-1] == 100
    assert GRIDS["kv"][0][0] == 1000 and GRIDS["kv"][0][-1] == 8000 and len(GRIDS["kv"][0]) == 71
    assert GRIDS["kv"][1] == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]


@pytest.mark.parametrize("form", ["kv", "original"])
def test_samples_hold_the_needle_at_its_depth(haystack, form):
    model = tiny_loaded()
    task = build_task("needle", {"form": form, "haystack_path": str(haystack), "lengths": [500, 800],
                                 "depths": [0, 50, 100]})
    samples = list(task.samples(model))
    assert task.size() == len(samples) == 6
    for sample in samples:
        text = model.tokenizer.decode(sample.prompt_ids)
        assert NEEDLE in text and sample.answers == [ANSWER]
        length, depth = sample.metadata["context_length"], sample.metadata["depth"]
        if form == "kv":
            assert text.startswith("<|im_start|> This is a very long story book: <book> ")
            assert text.endswith("</book>.\n Based on the content of the book, Question: The best thing to do in San "
                                 "Francisco is: \nAnswer:")
            assert sample.max_new_tokens == 30 and sample.stop_token_ids == model.tokenizer.encode("\n")
            book = text[len("<|im_start|> This is a very long story book: <book> "):text.index(" </book>")]
        else:
            assert "You are a helpful AI bot" in text and "Don't give information outside the document" in text
            assert sample.max_new_tokens == 300
            book = text[text.index("<|user|>\n") + 9:text.rindex("<|end|>\n<|user|>")]
        assert len(model.tokenizer.encode(book)) <= length - 200  # the 200-token buffer
        before = book[:book.index(NEEDLE)]
        assert depth == 0 and before == "" or depth == 100 and book.endswith(NEEDLE) or before.endswith(".")
        if depth == 50:
            assert abs(len(before) / (len(book) - len(NEEDLE)) - 0.5) < 0.1


def test_recall_is_the_share_of_answer_words_found():
    assert needle_recall("Eat a sandwich and sit in Dolores Park on a sunny day.", ANSWER) == 1.0
    assert needle_recall("eat a sandwich", ANSWER) == 3 / 11  # 11 distinct words, "day." with its period
    assert needle_recall("sunny day", ANSWER) == 1 / 11


def test_rouge_is_the_kv_papers_stored_score():
    assert rouge1_x10(NEEDLE, "") == 0.0
    full = rouge1_x10(NEEDLE, " eat a sandwich and sit in Dolores Park on a sunny day.\n")
    assert 0 < full < 10 and rouge1_x10(NEEDLE, NEEDLE) == pytest.approx(10.0)


def test_scores_and_breakdown():
    records = [{"task": "needle", "pred": "eat a sandwich", "answers": [ANSWER], "context_length": 1000,
                "depth": 0.0, "form": "kv", "needle": NEEDLE},
               {"task": "needle", "pred": ANSWER, "answers": [ANSWER], "context_length": 2000, "depth": 50.0,
                "form": "kv", "needle": NEEDLE}]
    scores = score_records(records)
    assert scores["task_scores"]["needle"] == round(100 * (3 / 11 + 1) / 2, 2)
    breakdown = scores["breakdown"]["needle"]
    assert breakdown["grid"] == {"0": {"1000": 3 / 11}, "50": {"2000": 1.0}}
    assert breakdown["overall_score"] == round((3 / 11 + 1) / 2, 3)
    assert breakdown["rouge1_x10"] == round((rouge1_x10(NEEDLE, "eat a sandwich") + rouge1_x10(NEEDLE, ANSWER)) / 2,
                                            3)


@pytest.mark.parametrize("options,message", [({"form": "sideways"}, "unknown form"),
                                             ({"lengths": [150]}, "exceed final_context_length_buffer"),
                                             ({"depths": [120]}, "depths must be percentages")])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_task("needle", options)


def test_missing_haystack_is_an_error(tmp_path):
    with pytest.raises(EvalkvError, match="haystack_path"):
        next(iter(build_task("needle", {}).samples(tiny_loaded())))
    with pytest.raises(EvalkvError, match="not found"):
        next(iter(build_task("needle", {"haystack_path": str(tmp_path / "none.json")}).samples(tiny_loaded())))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pred_score_and_heatmap(tmp_path, haystack, capsys):
    args = ["pred", "model=random-tiny-llama", "model.device=cpu", "progress=false", "task=needle",
            f"task.haystack_path={haystack}", "task.lengths=[400,500,600]", "task.depths=[0,100]",
            "task.max_new_tokens=4", f"output_dir={tmp_path / 'results'}"]
    assert main(args) == 0
    run = next((tmp_path / "results").rglob("predictions.jsonl")).parent
    assert main(["score", str(run)]) == 0
    assert json.loads((run / "scores.json").read_text())["n"] == {"needle": 6}
    output = tmp_path / "plots" / "heatmap.png"
    assert main(["plot", "needle", str(run), str(run), "-o", str(output)]) == 0
    width, height = figure_size(3, 2)
    assert _png_size(output) == (int(width * DPI), int(height * DPI))
    capsys.readouterr()
    assert main(["plot", "needle", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
