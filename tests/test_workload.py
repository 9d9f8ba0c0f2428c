"""The LongBench-shaped workload of `evalkv bench --workload longbench`: LongBench's lengths and generation lengths,
seeded, clipped, saved and read back."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import SHARED_DATA

from evalkv.errors import EvalkvError
from evalkv.run.workload import build_workload, read_workload, sample_lengths, write_workload

# LongBench/task.md's average lengths in words of the 16 English tasks, copied here independently of
# evalkv/tasks/longbench/spec.py so that a wrong table there fails.
TASK_MD_WORDS = {
    "narrativeqa": 18409, "qasper": 3619, "multifieldqa_en": 4559, "hotpotqa": 9151, "2wikimqa": 4887,
    "musique": 11214, "gov_report": 8734, "qmsum": 10614, "multi_news": 2113, "trec": 5177, "triviaqa": 8209,
    "samsum": 6258, "passage_count": 11141, "passage_retrieval_en": 9289, "lcc": 1235, "repobench-p": 4206,
}
# LongBench/config/dataset2maxlen.json, likewise.
DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}
CODE_TASKS = ("lcc", "repobench-p")


def test_workload_is_deterministic_and_seeded():
    first = build_workload(vocab_size=1000, samples_per_task=2, max_length=2048)
    assert first == build_workload(vocab_size=1000, samples_per_task=2, max_length=2048)
    other = build_workload(vocab_size=1000, samples_per_task=2, max_length=2048, seed=1)
    assert [s["prompt_ids"] for s in other["samples"]] != [s["prompt_ids"] for s in first["samples"]]


def test_a_task_lengths_do_not_depend_on_the_sample_count():
    assert sample_lengths("qasper", 5, seed=0)[:3] == sample_lengths("qasper", 3, seed=0)


def test_every_english_task_generates_longbench_max_new_tokens():
    workload = build_workload(vocab_size=50, samples_per_task=3, max_length=512)
    tasks = [sample["task"] for sample in workload["samples"]]
    assert sorted(set(tasks)) == sorted(DATASET2MAXLEN) and all(tasks.count(t) == 3 for t in DATASET2MAXLEN)
    for sample in workload["samples"]:
        assert sample["max_new_tokens"] == DATASET2MAXLEN[sample["task"]]
        assert all(0 <= token < 50 for token in sample["prompt_ids"])


def test_mean_length_tracks_longbench_task_table():
    """Unclipped, each task's mean prompt length is task.md's average in words times the tokens per word (1.44 for
    prose, 2.66 for code) within 3 % (4000 draws: about 1 % standard error), so an entry off by 5 % fails."""
    for task, words in TASK_MD_WORDS.items():
        lengths = sample_lengths(task, 4000, seed=0, min_length=1, max_length=10**9)
        expected = words * (2.66 if task in CODE_TASKS else 1.44)
        assert statistics.mean(lengths) == pytest.approx(expected, rel=0.03), task


def test_lengths_are_clipped_to_the_given_range():
    workload = build_workload(vocab_size=100, samples_per_task=8, min_length=3000, max_length=4000)
    lengths = {sample["task"]: [] for sample in workload["samples"]}
    for sample in workload["samples"]:
        lengths[sample["task"]].append(len(sample["prompt_ids"]))
    assert all(3000 <= n <= 4000 for values in lengths.values() for n in values)
    assert set(lengths["narrativeqa"]) == {4000}  # ~26.5K tokens on average: always cut to max_length
    assert 3000 in lengths["lcc"]  # ~3.3K on average: some draws fall under min_length


def test_bad_workload_arguments_are_refused():
    with pytest.raises(EvalkvError, match="min_length <= max_length"):
        build_workload(vocab_size=100, min_length=500, max_length=100)
    with pytest.raises(EvalkvError, match="at least 1"):
        build_workload(vocab_size=100, samples_per_task=0)


def test_workload_file_round_trips(tmp_path):
    workload = build_workload(vocab_size=300, samples_per_task=1, max_length=300)
    path = tmp_path / "workload.json"
    write_workload(path, workload)
    assert read_workload(path) == workload
    assert [p.name for p in tmp_path.iterdir()] == ["workload.json"]  # the temporary file was renamed


def test_reading_something_else_fails_clearly(tmp_path):
    with pytest.raises(EvalkvError, match="does not exist"):
        read_workload(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(EvalkvError, match="not an evalkv workload"):
        read_workload(tmp_path / "other.json")


def test_task_table_matches_the_multi_news_file():
    path = SHARED_DATA / "longbench" / "multi_news.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (set EVALKV_SHARED_DATA)")
    lengths = [json.loads(line)["length"] for line in path.read_text().splitlines()]
    assert round(statistics.mean(lengths)) == TASK_MD_WORDS["multi_news"]
