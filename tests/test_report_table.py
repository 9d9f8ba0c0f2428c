"""`evalkv table`: category columns and averages, the query-aware flag, deltas against the full cache, the RULER and
LongBench-E views, and missing scores shown as missing (never 0, never dropped)."""

from __future__ import annotations

import json

from report_runs import longbench, make_run

from evalkv.cli import main

TASKS = ["hotpotqa", "2wikimqa", "passage_count"]


def _csv(capsys, *args: str) -> list[list[str]]:
    assert main(["table", *args, "--format", "csv"]) == 0
    return [line.split(",") for line in capsys.readouterr().out.strip().splitlines()]


def test_tasks_are_grouped_by_category_with_category_and_overall_averages(tmp_path, capsys):
    make_run(tmp_path / "a", *longbench("snapkv", TASKS, {"hotpotqa": 40.0, "2wikimqa": 30.5, "passage_count": 9.0}))
    header, row = _csv(capsys, str(tmp_path))
    assert header == ["model", "method", "budget", "hotpotqa", "2wikimqa", "Multi-Doc QA", "passage_count",
                      "Synthetic", "average"]
    assert row == ["random-tiny-llama", "snapkv", "128", "40.0", "30.5", "35.25", "9.0", "9.0", "26.5"]


def test_longbench_e_and_ruler_tasks_get_their_own_categories(tmp_path, capsys):
    make_run(tmp_path / "e", *longbench("snapkv", ["hotpotqa_e"], {"hotpotqa_e": 20.0}))
    make_run(tmp_path / "r", ["method=snapkv", "budget=128", "task=ruler", "task.tasks=[niah_single_1,vt]"],
             {"task_scores": {"niah_single_1": 90.0, "vt": 60.0}})
    make_run(tmp_path / "p", ["method=snapkv", "budget=128"], {"task_scores": {"passkey": 100.0}})
    header, row = _csv(capsys, str(tmp_path))
    assert header[3:] == ["hotpotqa_e", "Multi-Doc QA (E)", "niah_single_1", "vt", "RULER", "passkey", "average"]
    assert row[3:] == ["20.0", "20.0", "90.0", "60.0", "75.0", "100.0", "67.5"]


def test_query_agnostic_runs_get_their_own_rows(tmp_path, capsys):
    make_run(tmp_path / "aware", *longbench("snapkv", ["hotpotqa"], {"hotpotqa": 40.0}))
    make_run(tmp_path / "agnostic", *longbench("snapkv", ["hotpotqa"], {"hotpotqa": 25.0}, "compress=context"))
    rows = _csv(capsys, str(tmp_path))
    assert rows[0][:4] == ["model", "method", "budget", "query"]
    assert [row[3:5] for row in rows[1:]] == [["aware", "40.0"], ["agnostic", "25.0"]]


def test_deltas_subtract_the_full_row_of_the_same_model(tmp_path, capsys):
    make_run(tmp_path / "full", *longbench("full", TASKS, {"hotpotqa": 50.0, "2wikimqa": 40.0, "passage_count": 10.0}))
    snapkv = {"hotpotqa": 45.5, "2wikimqa": 40.0, "passage_count": 12.0}
    make_run(tmp_path / "snap", *longbench("snapkv", TASKS, snapkv))
    assert main(["table", str(tmp_path), "--delta"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| random-tiny-llama | full | - | 50.00 | 40.00 | 45.00 | 10.00 | 10.00 | 33.33 |"
    assert lines[3] == "| random-tiny-llama | snapkv | 128 | -4.50 | +0.00 | -2.25 | +2.00 | +2.00 | -0.83 |"
    rows = _csv(capsys, str(tmp_path), "--delta")
    assert rows[2][3] == "-4.5"


def test_deltas_of_a_model_without_a_full_run_are_missing_and_said(tmp_path, capsys):
    make_run(tmp_path / "snap", *longbench("snapkv", ["hotpotqa"], {"hotpotqa": 45.0}))
    assert main(["table", str(tmp_path), "--delta"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[2] == "| random-tiny-llama | snapkv | 128 | - | - | - |"
    assert "random-tiny-llama: no full-cache run" in captured.err


def test_a_task_a_run_never_scored_and_a_run_without_records_show_as_missing(tmp_path, capsys):
    make_run(tmp_path / "partial", *longbench("snapkv", TASKS, {"hotpotqa": 45.0}), status="running")
    make_run(tmp_path / "nothing", ["method=tova", "budget=128", "task=longbench", "task.tasks=[hotpotqa]"], None,
             status="running")
    assert main(["table", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == ("| model | method | budget | hotpotqa | 2wikimqa | Multi-Doc QA | passage_count | Synthetic "
                        "| average |")
    assert lines[2] == "| random-tiny-llama | snapkv | 128 | 45.00 | - | - | - | - | - |"
    assert lines[3] == "| random-tiny-llama | tova | 128 | - | - | - | - | - | - |"
    assert f"{tmp_path / 'partial'}: unfinished run" in captured.err
    assert f"{tmp_path / 'nothing'}: unfinished run" in captured.err


def test_runs_of_the_same_row_fill_each_others_missing_cells(tmp_path, capsys):
    make_run(tmp_path / "one", *longbench("snapkv", ["hotpotqa", "2wikimqa"], {"hotpotqa": 45.0}))
    make_run(tmp_path / "two", *longbench("snapkv", ["2wikimqa"], {"2wikimqa": 35.0}))
    header, row = _csv(capsys, str(tmp_path))
    assert dict(zip(header, row))["2wikimqa"] == "35.0" and dict(zip(header, row))["average"] == "40.0"


def test_ruler_view_averages_its_tasks_per_context_length(tmp_path, capsys):
    breakdown = {"niah_single_1": {"by_context_length": {"4096": 100.0, "8192": 80.0}},
                 "vt": {"by_context_length": {"4096": 70.0, "8192": 50.0}}}
    scores = {"task_scores": {"niah_single_1": 90.0, "vt": 60.0}, "breakdown": breakdown}
    make_run(tmp_path / "r", ["method=snapkv", "budget=128", "task=ruler", "task.tasks=[niah_single_1,vt]",
                              "task.lengths=[4096,8192]"], scores)
    assert _csv(capsys, str(tmp_path), "--view", "ruler") == [
        ["model", "method", "budget", "4096", "8192", "average"], ["random-tiny-llama", "snapkv", "128", "85.0",
                                                                   "65.0", "75.0"]]


def test_longbench_e_view_averages_its_tasks_per_length_bucket(tmp_path, capsys):
    breakdown = {"hotpotqa_e": {"by_length": {"0-4k": 40.0, "4-8k": 30.0, "8k+": 20.0}},
                 "qasper_e": {"by_length": {"0-4k": 20.0, "4-8k": 10.0, "8k+": None}}}
    scores = {"task_scores": {"hotpotqa_e": 30.0, "qasper_e": 15.0}, "breakdown": breakdown}
    make_run(tmp_path / "e", *longbench("snapkv", ["hotpotqa_e", "qasper_e"], {}), )
    (tmp_path / "e" / "scores.json").write_text(json.dumps(scores))
    assert _csv(capsys, str(tmp_path), "--view", "longbench_e") == [
        ["model", "method", "budget", "0-4k", "4-8k", "8k+"], ["random-tiny-llama", "snapkv", "128", "30.0", "20.0",
                                                               ""]]


def test_a_benchmark_view_without_its_runs_is_a_clear_error(tmp_path, capsys):
    make_run(tmp_path / "p", ["method=snapkv", "budget=128"], {"task_scores": {"passkey": 100.0}})
    assert main(["table", str(tmp_path), "--view", "ruler"]) == 2
    assert "no run has" in capsys.readouterr().err
