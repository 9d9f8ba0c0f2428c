"""kvpress's leaderboard in evalkv: kvpress evaluation folders read as rows, the leaderboard view of `evalkv table`,
and score-versus-compression-ratio curves (beside budget curves)."""

from __future__ import annotations

import csv
import io
import json

from kvpress_folders import LLAMA, kvpress_folder
from report_runs import make_run

from evalkv.cli import main
from evalkv.report import curves
from evalkv.report.kvpress import kvpress_model_name, listed
from evalkv.report.page import run_configuration
from evalkv.report.runs import load_runs
from evalkv.report.table import build_table

MULTIVALUE = [f"magic-number-{i}-of-the-multivalue-needle" for i in range(4)]  # long: numpy wraps the cell
# (task, answers, prediction): niah_single_1 50 (string_match_all), niah_multivalue 75, qa_1 100
# (string_match_part, one of three), qa_2 0.
SAMPLES = [
    ("niah_single_1", ["8123456"], " 8123456."),
    ("niah_single_1", ["1234567"], "none"),
    ("niah_multivalue", MULTIVALUE, " ".join(MULTIVALUE[:3])),
    ("qa_1", ["Paris", "paris, france", 'it\'s "Paris"'], "Paris"),
    ("qa_2", ["x"], "y"),
]
METRICS = {"niah_multivalue": {"string_match": 75.0}, "niah_single_1": {"string_match": 50.0},
           "qa_1": {"string_match": 100.0}, "qa_2": {"string_match": 0.0}}


def _csv(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["table", *args, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_numpy_printed_list_cells_read_back_as_their_strings():
    assert listed("['8123' 'it\\'s \"x\"']") == ["8123", 'it\'s "x"']
    assert listed("['a long answer number one' 'another long answer two'\n 'third']") == [
        "a long answer number one", "another long answer two", "third"]
    assert listed("['a', 'b']") == ["a", "b"]
    assert listed("plain answer") == ["plain answer"]


def test_kvpress_hub_models_map_to_evalkv_model_configs():
    assert kvpress_model_name(LLAMA) == "llama3.1-8b-instruct"  # the hub's old id of the same repository
    assert kvpress_model_name("Qwen/Qwen3-8B") == "qwen3-8b"
    assert kvpress_model_name("org/unknown-model") == "org/unknown-model"


def test_a_kvpress_ruler_folder_is_a_row_with_kvpresss_own_scores(tmp_path, capsys):
    folder = kvpress_folder(tmp_path, "snapkv", 0.5, SAMPLES, METRICS)
    assert (folder / "predictions.csv").read_text().count("\n ") >= 1  # the multivalue answers wrapped as numpy does
    (run,) = load_runs([str(tmp_path)])
    assert (run.model, run.method, run.budget, run.query_aware, run.source) == (
        "llama3.1-8b-instruct", "kvpress:snapkv", "r0.5", False, "kvpress")
    assert run.scores["n"] == {"niah_multivalue": 1, "niah_single_1": 2, "qa_1": 1, "qa_2": 1}
    assert run.notes == []  # evalkv's RULER metric agrees on every task
    (row,) = _csv(capsys, str(tmp_path))
    assert (row["method"], row["budget"], row["query"]) == ("kvpress:snapkv", "r0.5", "agnostic")
    assert [row[task] for task in ("niah_single_1", "niah_multivalue", "qa_1", "qa_2", "RULER")] == [
        "50.0", "75.0", "100.0", "0.0", "56.25"]


def test_a_task_where_evalkvs_ruler_metric_disagrees_with_kvpress_is_named(tmp_path, capsys):
    """kvpress deletes control characters from a prediction, RULER turns them into newlines: "12\\n34" holds
    "1234" for kvpress only. The table keeps kvpress's score and says so."""
    kvpress_folder(tmp_path, "knorm", 0.25, [("niah_single_1", ["1234"], "12\n34")],
                   {"niah_single_1": {"string_match": 100.0}})
    (row,) = _csv(capsys, str(tmp_path))
    assert row["niah_single_1"] == "100.0"
    assert main(["table", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "evalkv's RULER metric on kvpress's predictions gives niah_single_1 0.00 (metrics.json 100.00); the " \
           "table shows kvpress's scores" in err
    assert main(["table", str(tmp_path), "--intervals"]) == 0
    assert "no interval there (a kvpress folder's metrics.json holds task scores only)" in capsys.readouterr().err


def test_kvpress_longbench_and_unreadable_kvpress_folders(tmp_path, capsys):
    kvpress_folder(tmp_path, "tova", 0.75, [], 41.5, dataset="longbench", data_dir="hotpotqa", model="Qwen/Qwen3-8B")
    kvpress_folder(tmp_path, "kvzap_mlp", 0.0, [("niah_single_1", ["1"], "1")], METRICS, threshold=-4.0)
    kvpress_folder(tmp_path, "snapkv", 0.5, [("niah_single_1", ["1"], "1")], {"cwe": [1, 2]})
    rows = _csv(capsys, str(tmp_path))
    assert [(row["model"], row["method"], row["budget"], row["hotpotqa"]) for row in rows] == [
        ("qwen3-8b", "kvpress:tova", "r0.75", "41.5")]
    assert main(["table", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "threshold=-4.0 (DMS / KVzap), which fixes no compression ratio" in err
    assert "metrics.json is not kvpress's ruler format" in err


def _evalkv_ruler_run(folder, method: str, ratio: float | None, scores: dict[str, float], model: str,
                      *extra: str) -> None:
    """An evalkv RULER run at 4096 tokens whose run.json labels say `model` (the configs' hub models cannot be
    composed offline here; the tiny model's config stands in)."""
    budget = [f"compression_ratio={ratio}"] if ratio is not None else []
    tasks = ",".join(scores)
    breakdown = {task: {"by_context_length": {"4096": score}} for task, score in scores.items()}
    make_run(folder, [f"method={method}", *budget, "task=ruler", f"task.tasks=[{tasks}]", "task.lengths=[4096]",
                      *extra], {"task_scores": scores, "breakdown": breakdown})
    info = json.loads((folder / "run.json").read_text())
    info["labels"]["model"] = model
    (folder / "run.json").write_text(json.dumps(info))


def test_leaderboard_view_lists_kvpress_and_evalkv_runs_in_the_leaderboards_columns(tmp_path, capsys):
    kvpress_folder(tmp_path / "kvpress", "snapkv", 0.5, SAMPLES, METRICS)
    kvpress_folder(tmp_path / "kvpress", "no_press", 0.0, SAMPLES,
                   {task: {"string_match": 100.0} for task in METRICS})
    model = "llama3.1-8b-instruct"
    _evalkv_ruler_run(tmp_path / "full", "full", None, {"niah_single_1": 100.0, "vt": 90.0}, model)
    _evalkv_ruler_run(tmp_path / "snap50", "snapkv", 0.5, {"niah_single_1": 80.0, "vt": 70.0}, model)
    _evalkv_ruler_run(tmp_path / "snap875", "snapkv", 0.875, {"niah_single_1": 40.0, "vt": None}, model)
    make_run(tmp_path / "budget", ["method=snapkv", "budget=128"], {"task_scores": {"passkey": 50.0}})
    capsys.readouterr()
    assert main(["table", str(tmp_path), "--view", "leaderboard", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "dataset,data_dir,model,method,compression_ratio,score"
    assert lines[1:] == [
        "ruler,4096,llama3.1-8b-instruct,full,0.0,95.0",
        "ruler,4096,llama3.1-8b-instruct,kvpress:no_press,0.0,100.0",
        "ruler,4096,llama3.1-8b-instruct,kvpress:snapkv,0.5,56.25",  # query-agnostic, kvpress's default
        "ruler,4096,llama3.1-8b-instruct,snapkv_query_aware,0.5,75.0",  # evalkv compresses the question too
        "ruler,4096,llama3.1-8b-instruct,snapkv_query_aware,0.875,",  # vt has no score: missing, never a mean of one
    ]
    assert "left out of the leaderboard view (an absolute budget, not a compression ratio): random-tiny-llama " \
           "snapkv 128" in err
    assert "the RULER scores average different task sets: 2 tasks (without niah_multivalue, qa_1, qa_2)" in err
    assert main(["table", str(tmp_path), "--view", "leaderboard"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == \
        "| dataset | data_dir | model | method | compression_ratio | score |"
    assert main(["table", str(tmp_path), "--view", "leaderboard", "--delta"]) == 2
    assert "--delta does not apply to the leaderboard view" in capsys.readouterr().err
    kvpress_run = next(run for run in load_runs([str(tmp_path)]) if run.source == "kvpress")
    assert run_configuration(kvpress_run) == {}  # the report page's configuration table is of evalkv runs only


def test_leaderboard_view_without_ratio_runs_is_a_clear_error(tmp_path, capsys):
    make_run(tmp_path / "budget", ["method=snapkv", "budget=128"], {"task_scores": {"passkey": 50.0}})
    assert main(["table", str(tmp_path), "--view", "leaderboard"]) == 2
    assert "no run has a compression ratio or the full cache" in capsys.readouterr().err


def _mixed_sweep(root):
    make_run(root / "full", ["method=full"], {"task_scores": {"passkey": 80.0}})
    for budget, score in ((32, 20.0), (64, 40.0)):
        make_run(root / f"snap{budget}", ["method=snapkv", f"budget={budget}"], {"task_scores": {"passkey": score}})
    for ratio, score in ((0.25, 70.0), (0.75, 30.0)):
        make_run(root / f"snap_r{ratio}", ["method=snapkv", f"compression_ratio={ratio}"],
                 {"task_scores": {"passkey": score}})


def test_budgets_and_ratios_get_a_row_of_panels_each(tmp_path, monkeypatch):
    _mixed_sweep(tmp_path)
    figures = []
    monkeypatch.setattr(curves, "save_figure", lambda figure, output: figures.append(figure) or output)
    curves.plot_curves(build_table(load_runs([str(tmp_path)])), tmp_path / "c.png")
    (figure,) = figures
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert [(axis.get_title(), axis.get_xscale()) for axis in panels] == [
        ("passkey (by budget)", "log"), ("passkey (by compression ratio)", "linear")]
    budget_axis, ratio_axis = panels
    assert budget_axis.get_xlabel().startswith("budget") and ratio_axis.get_xlabel().startswith("compression ratio")
    assert ratio_axis.get_xlim() == (0.0, 1.0)
    assert [tick.get_text() for tick in ratio_axis.get_xticklabels()] == ["0", "0.25", "0.75", "1"]
    for axis in panels:  # each panel: its own kind's points, and the full cache as a dashed line
        solid = [line for line in axis.get_lines() if line.get_linestyle() == "-"]
        dashed = [line for line in axis.get_lines() if line.get_linestyle() == "--"]
        assert len(solid) == 1 and [line.get_ydata()[0] for line in dashed] == [80.0]
    assert list(panels[1].get_lines()[0].get_xdata()) == [0.25, 0.75]
    assert list(panels[0].get_lines()[0].get_xdata()) == [32.0, 64.0]
