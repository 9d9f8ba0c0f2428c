"""The workloads of `evalkv bench --workload`: the LongBench-shaped one (LongBench's lengths and generation lengths)
and the reasoning-shaped one (uniform short prompts, long generations); seeded, clipped, saved and read back."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import SHARED_DATA

from evalkv.errors import EvalkvError
from evalkv.run.workload import (
    build_reasoning_workload,
    build_workload,
    read_workload,
    sample_lengths,
    write_workload,
)
from evalkv.run.workload import summary as workload_summary

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


def test_reasoning_workload_has_uniform_lengths_and_fixed_new_tokens():
    workload = build_reasoning_workload(vocab_size=50, samples=400, new_tokens=8192, min_length=100, max_length=1000)
    lengths = [len(sample["prompt_ids"]) for sample in workload["samples"]]
    assert len(lengths) == 400 and min(lengths) >= 100 and max(lengths) <= 1000
    assert statistics.mean(lengths) == pytest.approx(550, rel=0.05)  # uniform on [100, 1000]: mean 550, sd ~260
    assert min(lengths) < 150 and max(lengths) > 950  # spread over the whole range, not clipped to one end
    for sample in workload["samples"]:
        assert sample["task"] == "reasoning" and sample["max_new_tokens"] == 8192
        assert all(0 <= token < 50 for token in sample["prompt_ids"])
    assert (workload["workload"], workload["max_new_tokens"], workload["version"]) == ("reasoning", 8192, 1)


def test_reasoning_workload_defaults_are_64_samples_of_100_to_1000_tokens_and_8192_new():
    workload = build_reasoning_workload(vocab_size=10)
    assert len(workload["samples"]) == 64
    assert (workload["min_length"], workload["max_length"], workload["max_new_tokens"]) == (100, 1000, 8192)


def test_reasoning_workload_is_seeded_and_fewer_samples_are_a_prefix():
    first = build_reasoning_workload(vocab_size=1000, samples=6, new_tokens=4)
    assert first == build_reasoning_workload(vocab_size=1000, samples=6, new_tokens=4)
    assert build_reasoning_workload(vocab_size=1000, samples=3, new_tokens=4)["samples"] == first["samples"][:3]
    other = build_reasoning_workload(vocab_size=1000, samples=6, new_tokens=4, seed=1)
    assert [len(s["prompt_ids"]) for s in other["samples"]] != [len(s["prompt_ids"]) for s in first["samples"]]


def test_reasoning_workload_summary_and_file_round_trip(tmp_path):
    workload = build_reasoning_workload(vocab_size=300, samples=3, new_tokens=16, min_length=5, max_length=9)
    path = tmp_path / "reasoning.json"
    write_workload(path, workload)
    assert read_workload(path) == workload
    summary = workload_summary(workload)
    assert (summary["samples"], summary["new_tokens"], summary["max_new_tokens"]) == (3, 48, 16)
    assert summary["tasks"]["reasoning"]["samples"] == 3


def test_bad_reasoning_arguments_are_refused():
    with pytest.raises(EvalkvError, match="at least 1"):
        build_reasoning_workload(vocab_size=100, samples=0)
    with pytest.raises(EvalkvError, match="at least 1"):
        build_reasoning_workload(vocab_size=100, new_tokens=0)
    with pytest.raises(EvalkvError, match="min_length <= max_length"):
        build_reasoning_workload(vocab_size=100, min_length=50, max_length=10)
