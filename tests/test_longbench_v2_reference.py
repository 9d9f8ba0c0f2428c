"""evalkv's LongBench v2 against the reference itself: THUDM/LongBench@2e00731's `result.py` run unchanged on
predictions in its format, and `pred.py`'s own `get_pred` / `query_llm` / `extract_answer` run on a made-up data.json
with a stand-in chat server that records the prompts it is sent.

Needs a checkout of THUDM/LongBench at 2e00731 (its root: pred.py, result.py, prompts/) named by
EVALKV_LONGBENCH_CHECKOUT; skipped otherwise (the reference's code is not part of evalkv).
"""

from __future__ import annotations

import ast
import copy
import io
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
from longbench_v2_fixtures import question, write_data
from test_longbench_prompts import bos_model, raw
from test_longbench_v2_metrics import RESPONSES

from evalkv.metrics import score_records
from evalkv.metrics.longbench_v2 import extract_answer
from evalkv.tasks import build_task

CHECKOUT = Path(os.environ.get("EVALKV_LONGBENCH_CHECKOUT", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (CHECKOUT / "pred.py").is_file() or not (CHECKOUT / "result.py").is_file(),
                                reason="EVALKV_LONGBENCH_CHECKOUT does not name a THUDM/LongBench checkout (2e00731)")


def reference_functions(tokenizer, max_length: int) -> dict:
    """pred.py's query_llm, extract_answer and get_pred, defined from its source with its module globals stood in
    for: the config maps, the prompt files, a tokenizer loader returning `tokenizer`, a recording chat client."""
    source = (CHECKOUT / "pred.py").read_text(encoding="utf-8")
    wanted = {"query_llm", "extract_answer", "get_pred"}
    functions = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    sent: list[dict] = []
    replies: list[str] = []

    def create(model, messages, temperature, max_tokens):
        sent.append({"prompt": messages[0]["content"], "max_tokens": max_tokens})
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=replies.pop(0)))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    prompts = {name: (CHECKOUT / "prompts" / f"{name}.txt").read_text(encoding="utf-8")
               for name in ("0shot", "0shot_cot", "0shot_cot_ans", "0shot_no_context", "0shot_rag")}
    namespace = {
        "re": re, "json": json, "time": None, "tqdm": lambda items: items,
        "maxlen_map": {"model": max_length}, "model_map": {"model": "local/model"},
        "AutoTokenizer": SimpleNamespace(from_pretrained=lambda path, trust_remote_code: tokenizer),
        "OpenAI": lambda base_url, api_key: client, "URL": "", "API_KEY": "",
        "template_0shot": prompts["0shot"], "template_0shot_cot": prompts["0shot_cot"],
        "template_0shot_cot_ans": prompts["0shot_cot_ans"], "template_no_context": prompts["0shot_no_context"],
        "template_rag": prompts["0shot_rag"],
    }
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(CHECKOUT / "pred.py"), "exec"), namespace)
    return {**{name: namespace[name] for name in wanted}, "sent": sent, "replies": replies}


def questions() -> list[dict]:
    long_context = "Chapitre un: l'été à Genève. " * 6 + "$Q$ inside. " + "Fin de l'histoire. " * 6
    return [question(0), question(1, context=long_context), question(2, context="é" * 90 + "x")]


@pytest.mark.parametrize(("prompt", "flags"), [("0shot", {}), ("cot", {"cot": True}),
                                               ("no_context", {"no_context": True})])
def test_prompts_are_the_ones_pred_py_sends(tmp_path, prompt, flags):
    max_length = 401  # odd: pred.py keeps the first 200 ids and the last 201
    model = bos_model()
    reference = reference_functions(model.tokenizer, max_length)
    data = questions()
    reasoning = ["  Because the text says so.\n", "", "Hmm"]
    answers = ["The correct answer is (A)", "**The correct answer is (B)**", "The correct answer is Both"]
    for index in range(len(data)):
        if prompt == "cot":
            reference["replies"].append(reasoning[index])
            if reasoning[index]:
                reference["replies"].append(answers[index])
        else:
            reference["replies"].append(answers[index])
    output = io.StringIO()
    args = Namespace(**{"model": "model", "rag": 0, "no_context": False, "cot": False, **flags})
    reference["get_pred"](copy.deepcopy(data), args, output)

    task = build_task("longbench_v2", {"data_path": str(write_data(tmp_path / "data.json", data)), "prompt": prompt,
                                       "check_row_counts": False, "chat_template": True,
                                       "max_prompt_length": max_length})
    ours = []
    for sample, reply in zip(task.samples(model), reasoning):
        ours.append((raw(model, sample.prompt_ids), sample.max_new_tokens))
        if sample.follow_up is not None and (answer := sample.follow_up(reply)) is not None:
            ours.append((raw(model, answer.prompt_ids), answer.max_new_tokens))
    assert ours == [(model.chat_text(s["prompt"]), s["max_tokens"]) for s in reference["sent"]]
    truncated = [sample.metadata["truncated"] for sample in task.samples(model)]
    assert truncated == ([False, False, False] if prompt == "no_context" else [False, True, True])

    written = [json.loads(line) for line in output.getvalue().splitlines()]
    skipped = 1 if prompt == "cot" else 0  # pred.py drops the question whose reasoning came back empty
    assert len(written) == len(data) - skipped
    for item in written:
        assert extract_answer(item["response"]) == item["pred"]


def test_extract_answer_is_pred_pys():
    reference = reference_functions(bos_model().tokenizer, 100)
    for response, letter in RESPONSES:
        assert reference["extract_answer"](response) == letter == extract_answer(response)


def result_py(folder: Path, compensated: bool) -> list[str]:
    """result.py run unchanged on the files in `folder`/results (with compensated=True: its switch flipped)."""
    script = (CHECKOUT / "result.py").read_text(encoding="utf-8")
    if compensated:
        assert script.count("compensated = False") == 1
        script = script.replace("compensated = False", "compensated = True")
    (folder / "result.py").write_text(script, encoding="utf-8")
    subprocess.run([sys.executable, "result.py"], cwd=folder, check=True)
    header, line = (folder / "result.txt").read_text(encoding="utf-8").splitlines()
    assert header == "Model\tOverall\tEasy\tHard\tShort\tMedium\tLong"
    return line.split("\t")


def test_scores_are_what_result_py_prints(tmp_path):
    """The same responses as an evalkv predictions file and as pred.py's output (judged by its extract_answer)."""
    extract = reference_functions(bos_model().tokenizer, 100)["extract_answer"]
    records, official = [], []
    for index, (response, _) in enumerate(RESPONSES * 3):
        row = question(index)
        records.append({"id": row["_id"], "task": "longbench_v2", "pred": response, "answers": [row["answer"]],
                        "difficulty": row["difficulty"], "length": row["length"], "domain": row["domain"]})
        letter = extract(response.strip())
        official.append({**row, "context": row["context"][:1000], "response": response.strip(), "pred": letter,
                         "judge": letter == row["answer"]})
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "model.jsonl").write_text("".join(json.dumps(item) + "\n" for item in official))
    scores = score_records(records)
    breakdown = scores["breakdown"]["longbench_v2"]
    plain = [scores["task_scores"]["longbench_v2"], *breakdown["by_difficulty"].values(),
             *breakdown["by_length"].values()]
    assert result_py(tmp_path, compensated=False) == ["model", *map(str, plain)]
    assert result_py(tmp_path, compensated=True) == ["model", *map(str, breakdown["compensated"].values())]
