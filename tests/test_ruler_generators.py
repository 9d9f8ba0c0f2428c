"""Every RULER generator against its specification (specs/benchmarks.md §B.3): answers occur in the context as asked,
lengths fit the target within one haystack step, needles and keys are spread as RULER spreads them, distractors never
equal the answer, and the same inputs give the same samples."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from ruler_helpers import ESSAYS, FRAME, count_words, needs_essays, setting

from evalkv.tasks.essays import load_essays
from evalkv.tasks.ruler import common_words_extraction, freq_words_extraction, niah, qa, variable_tracking
from evalkv.tasks.ruler.constants import RULER_TASKS

NEEDLE_LINE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")


def essay_words() -> list[str]:
    return re.sub(r"\s+", " ", load_essays(ESSAYS)).split(" ")


def assert_fits(rows: list[dict], length: int, step_tokens: int) -> None:
    """RULER's sizing: every sample fits; none is more than two haystack steps (+5%) short of the target."""
    for row in rows:
        assert row["length"] == count_words(row["input"] + row["answer_prefix"]) + row["_ttg"]
        assert length - 2 * step_tokens - 0.05 * length <= row["length"] <= length


def generated(task: str, length: int, num_samples: int = 4, **kwargs) -> list[dict]:
    s = setting(task, length, num_samples)
    family = {"niah": niah, "variable_tracking": variable_tracking, "common_words_extraction": common_words_extraction,
              "freq_words_extraction": freq_words_extraction, "qa": qa}[RULER_TASKS[task].family]
    rows = family.generate(s, task, **kwargs)
    for row in rows:
        row["_ttg"] = s.tokens_to_generate
        assert row["input"].startswith(FRAME.prefix) and row["input"].endswith(FRAME.suffix)
    return rows


def needles_of(text: str) -> list[tuple[str, str, str]]:
    return NEEDLE_LINE.findall(text)


@pytest.mark.parametrize("task,length,values", [
    ("niah_single_1", 2048, 1), ("niah_multikey_2", 4096, 1), ("niah_multikey_3", 4096, 1),
])
def test_line_haystack_niah_hides_the_answers_as_asked(task, length, values):
    rows = generated(task, length, num_samples=6)
    kind = {"niah_multikey_3": "uuids"}.get(task, "numbers")
    step = 25 * count_words(niah.NEEDLE.format(type_needle_v=kind, key="x-y", value="1234567") + "\n")
    assert_fits(rows, length, step)
    for row in rows:
        assert len(row["outputs"]) == values and len(row["queries"]) == 1
        query = row["queries"][0]
        lines = needles_of(row["input"])
        answers = [value for _, key, value in lines if key == query]
        assert answers == row["outputs"]  # the queried key's needle, once, and no distractor with that key
        assert all(value != row["outputs"][0] for _, key, value in lines if key != query)
        assert f"What is the special magic {kind[:-1]} for {query} mentioned in the provided text?" in row["input"]
        assert row["answer_prefix"] == f" The special magic {kind[:-1]} for {query} mentioned in the provided text is"
        assert row["input"][len(FRAME.prefix):].startswith(f"A special magic {kind[:-1]} is hidden")
        if task == "niah_single_1":
            assert row["input"].count(niah.NOISE) == row["haystack_size"]
        else:
            assert len(lines) == row["haystack_size"] + 1  # every haystack line is a distractor needle
    assert len({row["needle_depths"][0] for row in rows}) > 2  # positions are drawn per sample
    assert max(r["needle_depths"][0] for r in rows) - min(r["needle_depths"][0] for r in rows) > 30


@needs_essays
@pytest.mark.parametrize("task,queries,values", [
    ("niah_single_2", 1, 1), ("niah_single_3", 1, 1), ("niah_multikey_1", 1, 1), ("niah_multivalue", 1, 4),
    ("niah_multiquery", 4, 1),
])
def test_essay_niah_hides_the_answers_at_sentence_boundaries(task, queries, values):
    words = essay_words()
    rows = generated(task, 4096, num_samples=5, essay_words=words)
    assert_fits(rows, 4096, count_words(" ".join(words[:500])))
    kind = "uuids" if task == "niah_single_3" else "numbers"
    for row in rows:
        assert len(row["queries"]) == queries and len(row["outputs"]) == queries * values
        lines = needles_of(row["input"])
        assert len(lines) == (4 if task != "niah_single_2" and task != "niah_single_3" else 1)
        asked = [value for _, key, value in lines if key in row["queries"]]
        assert sorted(asked) == sorted(row["outputs"])
        others = [value for _, key, value in lines if key not in row["queries"]]
        assert not set(others) & set(row["outputs"])
        assert all(kind_word == kind for kind_word, _, _ in lines)
        for _, key, value in lines:  # a needle stands between sentences: after ". " (or first), before " "
            needle = f"One of the special magic {kind} for {key} is: {value}."
            before = row["input"][:row["input"].index(needle)]
            assert before.endswith(("\n", ". ", "? ", "! ", '." ', " ")) and not before.endswith("  ")
        plural = queries * values > 1
        assert row["answer_prefix"].endswith(" are" if plural else " is")
        assert len(set(row["needle_depths"])) == len(row["needle_depths"])
    depths = sorted(d for row in rows for d in row["needle_depths"])
    assert depths[0] < 30 and depths[-1] > 70  # RULER draws depths from 40 points spread over 0..100%


def test_niah_multiquery_queries_distinct_keys_and_joins_them():
    rows = generated("niah_single_1", 2048, num_samples=1)
    assert len(rows) == 1
    s = setting("niah_single_1", 2048)
    s.args.update(num_needle_k=1, num_needle_q=4)
    gen = niah.NeedleHaystack(s, None)
    assert gen.num_k == 4  # k is raised to max(k, q)
    sample = gen.build(10)
    keys = sample.metadata["queries"]
    assert len(set(keys)) == 4
    assert f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}" in sample.input


def test_vt_chain_hides_every_variable_and_carries_an_example():
    rows = generated("vt", 2048, num_samples=4)
    assert_fits(rows, 2048, 5 * count_words(niah.NOISE + "\n"))
    for row in rows:
        names, value = row["outputs"], row["value"]
        assert len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        task_text = row["input"][row["input"].rindex("Memorize and track"):]
        positions = [task_text.index(f"VAR {names[0]} = {value}\n")]
        positions += [task_text.index(f"VAR {names[j + 1]} = VAR {names[j]} \n") for j in range(4)]
        assert positions == sorted(positions)
        assert row["answer_prefix"] == (" Answer: According to the chain(s) of variable assignment in the text above, "
                                        f"5 variables are assigned the value {value}, they are: ")
        example = row["input"][len(FRAME.prefix):row["input"].rindex("Memorize and track")]
        assert example.startswith("Memorize and track") and example.endswith("\n\n")
        example_names = example.split()[-5:]
        assert all(re.fullmatch(r"[A-Z]{3}", n) for n in example_names)
        assert "12345" not in example  # re-randomised for every sample
    examples = {row["input"][:row["input"].rindex("Memorize and track")] for row in rows}
    assert len(examples) == len(rows)


@pytest.mark.parametrize("length,common,uncommon", [(4096, 30, 3), (2048, 6, 1)])
def test_cwe_repeats_the_common_words_as_asked(length, common, uncommon):
    rows = generated("cwe", length, num_samples=3)
    assert_fits(rows, length, count_words(common_words_extraction.numbered(["word"] * 10 * uncommon)))
    for row in rows:
        main = row["input"][row["input"].rindex("Below is a numbered list"):]
        listed = re.findall(r"(\d+)\. (\S+)", main.split("\n")[1])
        assert [int(n) for n, _ in listed] == list(range(1, len(listed) + 1))
        counts = Counter(word for _, word in listed)
        assert len(row["outputs"]) == 10
        assert all(counts[word] == common for word in row["outputs"])
        assert all(n == uncommon for word, n in counts.items() if word not in row["outputs"])
        assert row["input"].count(" Answer: The top 10 words that appear most often in the list are: 1. ") == 1


def test_fwe_answers_are_the_three_most_frequent_coded_words():
    rows = generated("fwe", 4096, num_samples=3)
    for row in rows:
        assert row["length"] <= 4096
        context = row["input"][row["input"].index("coded words. ") + 13:row["input"].index("\nQuestion:")]
        counts = Counter(context.split())
        ranked = [word for word, _ in counts.most_common() if word != "..."]
        assert ranked[:3] == row["outputs"] and counts["..."] > counts[ranked[0]]
        assert counts[ranked[2]] > counts[ranked[3]]
        assert all(re.fullmatch(r"[a-z]{6}", word) for word in ranked)
    assert rows[0]["haystack_size"] == rows[1]["haystack_size"]  # RULER sizes the word count once


def test_generators_are_deterministic_and_seeded():
    first, again = generated("niah_multikey_2", 2048), generated("niah_multikey_2", 2048)
    assert json.dumps(first) == json.dumps(again)
    other = niah.generate(setting("niah_multikey_2", 2048, seed=7), "niah_multikey_2")
    assert [r["outputs"] for r in other] != [r["outputs"] for r in first]


def squad_fixture() -> dict:
    def paragraph(context, *qas):
        return {"context": context, "qas": [{"question": q, "answers": [{"text": a} for a in answers],
                                             "is_impossible": not answers} for q, answers in qas]}

    return {"data": [
        {"title": "A", "paragraphs": [
            paragraph("Alpha paragraph about the river Zeta and its fish.", ("Which river?", ["Zeta", "river Zeta"])),
            paragraph("Second alpha paragraph with nothing useful.", ("Impossible?", [])),
        ]},
        {"title": "B", "paragraphs": [
            paragraph("Beta paragraph: the tower is 300 metres tall.", ("How tall is the tower?", ["300 metres"])),
            paragraph("Another beta paragraph mentions cats.", ("What animal?", ["cats"])),
        ]},
    ]}


def hotpot_fixture() -> list:
    return [
        {"question": "Who founded Acme?", "answer": "Ada", "context": [["Acme", ["Acme was founded ", "by Ada."]],
                                                                       ["Ada", ["Ada was an engineer."]]]},
        {"question": "Where is Bolt?", "answer": "Oslo", "context": [["Bolt", ["Bolt is in Oslo."]],
                                                                     ["Oslo", ["Oslo is a city."]]]},
    ]


def test_qa_squad_reads_answerable_questions_in_file_order():
    questions, docs = qa.read_squad(squad_fixture())
    assert [q["query"] for q in questions] == ["Which river?", "How tall is the tower?", "What animal?"]
    assert docs == sorted(docs) and len(docs) == 4
    assert questions[0]["outputs"] == ["Zeta", "river Zeta"]
    assert [docs[i] for i in questions[0]["more_context"]] == ["Second alpha paragraph with nothing useful."]
    rows = generated("qa_1", 1024, num_samples=3, questions=questions, docs=docs)
    for row, question in zip(rows, questions):
        assert row["outputs"] == question["outputs"]
        assert docs[question["context"][0]] in row["input"] and f"Question: {question['query']}" in row["input"]
        numbers = [int(n) for n in re.findall(r"Document (\d+):\n", row["input"])]
        assert numbers == list(range(1, len(numbers) + 1))
        assert row["answer_prefix"] == " Answer:" and row["length"] <= 1024


def test_qa_hotpotqa_documents_join_title_and_sentences():
    questions, docs = qa.read_hotpotqa(hotpot_fixture())
    assert "Acme\nAcme was founded by Ada." in docs and questions[1]["outputs"] == ["Oslo"]
    rows = generated("qa_2", 1024, num_samples=2, questions=questions, docs=docs)
    assert "Document 1:\n" in rows[0]["input"] and "Acme\nAcme was founded by Ada." in rows[0]["input"]
