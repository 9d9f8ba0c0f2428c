"""LongGenBench's GSM8K (arXiv 2410.04199): k GSM8K problems in one prompt built as the reference script builds it,
answered in one long generation, scored as the reference scores it (checked against an independent re-implementation
of the reference's write-then-read-back path), and run end to end on the tiny model."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import tiny_loaded

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.metrics.longgenbench import answers_of, judged, same_answer
from evalkv.records import read_records
from evalkv.tasks import build_task
from evalkv.tasks.reasoning.longgenbench import EXEMPLARS, SYSTEM, user_turn

# sha256 of data/LongGenBench_GSM8K_prompt/LongGenBench_prompt.txt in Dominic789654/LongGenBench at commit 9845864.
REFERENCE_PROMPT_FILE_SHA256 = "93073b0264ee3bee516f1014460de3569d155a2a7647a8d3b2c5788f90717977"
ROWS = [{"question": "Tom has 2 apples and buys 3. How many now?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
        {"question": "A box holds 1,000 pens and 200 more. How many?", "answer": "1000+200=1200\n#### 1,200"},
        {"question": "What is 7 times 6?", "answer": "7*6=42\n#### 42"},
        {"question": "Half of 9?", "answer": "9/2=4.5\n#### 4.5"},
        {"question": "Ann has 3 cats. How many legs?", "answer": "3*4=12\n#### 12"}]


def _data(tmp_path) -> str:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def test_the_exemplars_are_the_reference_file_byte_for_byte():
    assert hashlib.sha256(EXEMPLARS.encode("utf-8")).hexdigest() == REFERENCE_PROMPT_FILE_SHA256
    assert EXEMPLARS.startswith("Question_1: \nThere are 15 trees") and EXEMPLARS.endswith("The answer is 8.")


def test_the_user_turn_numbers_the_questions_after_the_exemplars():
    assert user_turn(["Q one?", "Q two?"]) == (
        "Examples: \n" + EXEMPLARS + "\n\nFollowing Question: \nQuestion_9:\nQ one?\nQuestion_10:\nQ two?\n\n")


def test_prompts_hold_k_problems_each_through_the_chat_template(tmp_path):
    model = tiny_loaded()
    task = build_task("longgenbench_gsm8k", {"data_path": _data(tmp_path), "k": 2})
    samples = list(task.samples(model))
    assert task.size() == 3 and [s.id for s in samples] == [f"longgenbench_gsm8k-{i}" for i in range(3)]
    assert [s.answers for s in samples] == [[ROWS[0]["answer"], ROWS[1]["answer"]],
                                            [ROWS[2]["answer"], ROWS[3]["answer"]], [ROWS[4]["answer"]]]
    assert [s.metadata["questions"] for s in samples] == [2, 2, 1] and samples[2].metadata["first_problem"] == 4
    text = model.tokenizer.decode(samples[1].prompt_ids)
    assert text == (f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n{user_turn([ROWS[2]['question'], ROWS[3]['question']])}"
                    "<|end|>\n<|assistant|>\n")
    assert samples[0].max_new_tokens == 4096
    limited = build_task("longgenbench_gsm8k", {"data_path": _data(tmp_path), "k": 2, "question_limit": 3})
    assert [s.answers for s in limited.samples(model)][-1] == [ROWS[2]["answer"]]
    plain = next(build_task("longgenbench_gsm8k", {"data_path": _data(tmp_path), "chat_template": False})
                 .samples(model))
    assert model.tokenizer.decode(plain.prompt_ids).endswith(SYSTEM + "\n\n" + user_turn([r["question"] for r in ROWS]))


@pytest.mark.parametrize("options, message", [
    ({"k": 0}, "k must be >= 1"),
    ({"question_limit": 0}, "question_limit must be >= 1"),
    ({"compress": "context"}, "use compress=prompt"),
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_task("longgenbench_gsm8k", options)


def _reference_counts(outputs: list[str], solutions: list[list[str]]) -> tuple[int, int]:
    """(counted questions, correct) as the reference gets them: each prompt's block of `Question: / A_model: /
    A_gold:` text written as `process_question` writes it, then read back line by line as `parse_pred_ans` reads it
    (an independent re-implementation, not evalkv's code path)."""
    text = ""
    for output, golds in zip(outputs, solutions):
        cut = "\n".join(output.split("Answer_"))
        found = [piece.strip() for piece in re.findall(r"(?<=:\n)(.*?)(?=\n\n|$)", cut, re.DOTALL)]
        for i, (gold, answer) in enumerate(zip(golds, found)):
            text += f"Question: q{i}\nA_model:Q_{i}\n{answer}\nA_gold:\n{gold}\n\n"
    blocks, mode = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("Question:"):
            blocks.append({"am": "", "a": ""})
            mode = "q"
        elif line.startswith("A_model:"):
            mode, blocks[-1]["am"] = "am", line
        elif line.startswith("A_gold:"):
            mode, blocks[-1]["a"] = "a", line
        elif mode in ("am", "a"):
            blocks[-1][mode] += line

    def last(pattern_text: str) -> str | None:
        numbers = re.findall(r"\d*\.?\d+", pattern_text)
        return numbers[-1] if numbers else None

    correct = sum(1 for block in blocks if (p := last(block["am"].replace(",", ""))) is not None
                  and p == last(block["a"]))
    return len(blocks), correct


OUTPUTS = [
    # every question answered in the exemplars' format; the second answer written with a separator
    "Answer_9:\nTom had 2 and bought 3.\n2 + 3 = 5.\nThe answer is 5.\n\nAnswer_10:\n1,000 + 200 = 1,200.\n"
    "The answer is 1,200.\n\nAnswer_11:\n7 * 6 = 42.\nThe answer is 42.",
    # one wrong, one answer with no number (counts as its index), and a trailing unfinished answer
    "Answer_9:\nThe answer is 6.\n\nAnswer_10:\nI cannot tell.\n\nAnswer_11:\nThe answer is 4",
    # an answer ends at its first blank line, and the `:\n` inside it starts no other (the matches do not overlap)
    "Answer_9:\nStep 1:\n2 + 3 = 5\n\nThe answer is 5.\n\nAnswer_10:\nThe answer is 1200.",
    # stops after one answer: only one question is counted
    "Answer_9:\nThe answer is 5.",
    # no answer at all
    "I will not answer.",
]


def test_scoring_equals_the_reference_write_then_read_back_path():
    golds = [ROWS[0]["answer"], ROWS[1]["answer"], ROWS[2]["answer"]]
    records = [{"task": "longgenbench_gsm8k", "pred": output, "answers": golds, "id": f"p{i}"}
               for i, output in enumerate(OUTPUTS)]
    counted, correct = _reference_counts(OUTPUTS, [golds] * len(OUTPUTS))
    assert (counted, correct) == (3 + 3 + 2 + 1 + 0, 2 + 0 + 1 + 1 + 0)
    assert [judged(record) for record in records] == [(3, 3, 2), (3, 3, 0), (3, 2, 1), (3, 1, 1), (3, 0, 0)]
    scores = score_records(records)
    assert scores["task_scores"]["longgenbench_gsm8k"] == round(100 * correct / counted, 2) == 44.44
    view = scores["breakdown"]["longgenbench_gsm8k"]["longgenbench"]
    assert (view["questions"], view["answered"], view["correct"], view["all_questions"]) == (15, 9, 4, 26.67)
    assert scores["sample_scores"]["longgenbench_gsm8k"]["scores"] == [0.666667, 0, 0.333333, 0.333333, 0]


def test_the_reference_comparison_quirks_are_kept():
    assert answers_of("Answer_9:\nx = 3.\nThe answer is 3.\n\nAnswer_10:\nThe answer is 4.") == [
        "x = 3.\nThe answer is 3.", "The answer is 4."]
    assert same_answer(0, "The answer is 5.", "#### 5") and not same_answer(0, "The answer is 6.", "#### 5")
    assert same_answer(3, "no number here", "3 apples\n#### 3")  # an answer without a number is its index
    assert not same_answer(1, "The answer is 1,200.", "#### 1,200")  # gold keeps its comma: its last group is 200
    assert same_answer(1, "The answer is 200.", "#### 1,200")
    assert same_answer(2, "The answer is 4.50", "#### 4.5") is False  # strings, not numbers, are compared


@pytest.mark.heavy
def test_a_tiny_model_run_scores_every_prompt(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["pred", "model=random-tiny-llama", "model.device=cpu", "progress=false", f"output_dir={out}",
                 "task=longgenbench_gsm8k", f"task.data_path={_data(tmp_path)}", "task.k=2",
                 "task.max_new_tokens=24", "method=h2o", "budget=64"]) == 0
    (predictions,) = out.rglob("predictions.jsonl")
    records = read_records(predictions)
    assert [len(record["answers"]) for record in records] == [2, 2, 1]
    assert all(record["new_tokens"] <= 24 and record["kept_tokens"] <= 64 for record in records)
    assert main(["score", str(predictions.parent)]) == 0
    scores = json.loads((predictions.parent / "scores.json").read_text())
    assert scores["breakdown"]["longgenbench_gsm8k"]["longgenbench"]["questions"] == 5
    capsys.readouterr()
    assert main(["table", str(out), "--view", "longgenbench"]) == 0
    header, _, row = (line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()[:3])
    cells = dict(zip((cell.strip() for cell in header), (cell.strip() for cell in row)))
    assert cells["method"] == "h2o" and cells["longgenbench_gsm8k/questions"] == "5"  # a count, no decimals
