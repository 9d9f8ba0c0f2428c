"""Small LongBench data folders made by the tests (the official files are not needed)."""

from __future__ import annotations

import json
from pathlib import Path


def row(task: str, index: int, context: str = "", question: str = "", **extra) -> dict:
    """A row in the official layout (input, context, answers, length, dataset, language, all_classes, _id)."""
    return {
        "input": question or f"Who wrote book {index}?",
        "context": context or f"Passage 1:\nBook {index} was written by Alice Smith.\nPassage 2:\nBob likes tea.",
        "answers": ["Alice Smith"],
        "length": 1000 + 3000 * index,
        "dataset": task,
        "language": "en",
        "all_classes": None,
        "_id": f"{task}-{index:04d}",
        **extra,
    }


def write_task(folder: Path, name: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def small_longbench(folder: Path) -> Path:
    """hotpotqa (3 rows), samsum, trec and hotpotqa_e (2 rows): enough for a run through every code path."""
    write_task(folder, "hotpotqa", [row("hotpotqa", i) for i in range(3)])
    write_task(folder, "samsum", [row("samsum", i, context="Dialogue: Cat: bye\nSummary: Cat leaves.",
                                      question="Dialogue: Ann: hi\nBen: hello\nSummary: ",
                                      answers=["Ann and Ben greet."]) for i in range(2)])
    write_task(folder, "trec", [row("trec", i, context="Question: Who is Bob ?\nType: Individual",
                                    question="Question: Where is Paris ?\nType:", answers=["City"],
                                    all_classes=["City", "Individual", "Other location"]) for i in range(2)])
    write_task(folder, "hotpotqa_e", [row("hotpotqa_e", i) for i in range(2)])
    return folder
