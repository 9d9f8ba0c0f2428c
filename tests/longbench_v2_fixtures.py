"""A small LongBench v2 data.json made by the tests, in the official schema (the real file is not needed)."""

from __future__ import annotations

import json
from pathlib import Path

DOMAINS = ("Single-Document QA", "Multi-Document QA", "Code Repository Understanding")


def question(index: int, context: str = "", **extra) -> dict:
    """One question in data.json's layout: `_id, domain, sub_domain, difficulty, length, question, choice_A..D,
    answer, context` (every field a string)."""
    return {
        "_id": f"66f36490821e116aacb2{index:04x}",
        "domain": DOMAINS[index % len(DOMAINS)],
        "sub_domain": "Academic",
        "difficulty": ("easy", "hard")[index % 2],
        "length": ("short", "medium", "long")[index % 3],
        "question": f"  Who wrote book {index}? ",
        "choice_A": "Alice Smith ",
        "choice_B": " Bob Jones",
        "choice_C": "Carol White",
        "choice_D": "Dan Brown",
        "answer": "ABCD"[index % 4],
        "context": context or f"\nBook {index} was written by Alice Smith. Bob likes tea.\n",
        **extra,
    }


def write_data(path: Path, questions: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(questions, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def small_data(folder: Path, count: int = 4) -> Path:
    return write_data(folder / "data.json", [question(index) for index in range(count)])
