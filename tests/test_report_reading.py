"""Reports read run files, not code: labels come from run.json (or, for folders made before evalkv wrote them, from
config.yaml and run.json as plain data); a run without records shows as missing; an unreadable run is named and
skipped; the benchmark views treat a partial run's missing lengths as missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from report_runs import longbench, make_run

from evalkv.cli import main
from evalkv.config import compose_run, options
from evalkv.methods import build_method
from evalkv.report.runs import derived_labels
from evalkv.run.pred import run_labels, run_method_label
from evalkv.tasks import build_task

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.mark.parametrize("view,fmt,expected", [
    ("scores", "md", "scores.md"), ("scores", "csv", "scores.csv"), ("scores", "json", "scores.json"),
    ("timing", "md", "timing.md"), ("by_depth", "md", "by_depth.md"),
])
def test_a_folder_of_todays_runs_reads_as_it_did(capsys, view, fmt, expected):
    """tests/data/legacy: runs made by evalkv pred before run.json had labels; the table printed then is stored."""
    assert main(["table", str(LEGACY / "runs"), "--view", view, "--format", fmt]) == 0
    assert capsys.readouterr().out == (LEGACY / "expected" / expected).read_text()


@pytest.mark.parametrize("overrides", [
    ["method=snapkv", "budget=64", "method.window_size=8"],
    ["method=streaming_llm", "compression_ratio=0.5"],
    ["method=full", "budget=64"],  # a sweep's budget, which the full cache ignores
    ["method=full"],
    ["method=obcache", "method.recent_ratio=0.1", "method.heavy_ratio=0.1"],  # no budget in its label
    ["method=sink_recent_uniform", "budget=1024"],
    ["method=adakv", "budget=256", "method.window_size=16"],
    ["method=snapkv", "budget=64", "task=longbench", "task.tasks=[all_e]", "compress=context"],
    ["method=snapkv", "budget=64", "task=ruler", "task.tasks=[niah_multiquery]", "compress=context",
     "task.split_queries=true"],
    ["method=h2o", "budget=32", "task=ruler", "task.tasks=[niah_single_1,vt]", "task.lengths=[4096,8192]"],
    ["method=tova", "budget=32", "task=minilongbench", "task.tasks=[hotpotqa,trec]"],
    ["method=snapkv", "budget=32", "task=needle"],
    ["method=snapkv", "budget=32", "cache.quant=kivi4", "cache.residual=64"],
    ["method=kvcV+tova", "budget=32"],
    ["method=kvcV+tova", "budget=32", "cache.quant=kivi2", "method.decode_evict=false"],
])
def test_labels_derived_from_todays_files_equal_those_pred_writes(overrides):
    cfg = compose_run(["model=random-tiny-llama", *overrides])
    method = build_method(cfg.method.name, options(cfg.method))
    task = build_task(cfg.task.name, options(cfg.task))
    config = OmegaConf.to_container(cfg, resolve=True)
    assert derived_labels(config, {"method": run_method_label(cfg, method)}) == run_labels(cfg, method, task)


def test_todays_labels_are_what_the_table_showed():
    run = LEGACY / "runs" / "passkey-lengths=256" / "random-tiny-llama" / "snapkv_64-window_size=8"
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    labels = derived_labels(config, json.loads((run / "run.json").read_text()))
    assert labels == {"model": "random-tiny-llama", "method": "snapkv", "method_variant": "window_size=8",
                      "budget": "64", "cache": "none", "query": "aware", "expected_tasks": ["passkey"],
                      "context_lengths": [256]}


def test_labels_in_run_json_win_over_the_config(tmp_path, capsys):
    """A run is shown as run.json's labels say, even when its config no longer builds (here: an unknown method)."""
    run = make_run(tmp_path / "run", ["method=snapkv", "budget=64"], {"task_scores": {"passkey": 40.0}})
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("name: snapkv", "name: gone"))
    assert main(["table", str(tmp_path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "random-tiny-llama,snapkv,64,40.0,40.0"


def _empty_run(folder: Path) -> Path:
    """What a run stopped before its first record leaves: config.yaml, run.json `running`, an empty predictions file."""
    run = make_run(folder, ["method=tova", "budget=128"], None, status="running")
    (run / "predictions.jsonl").write_text("")
    return run


def _passkey_run(folder: Path, preds: list[str]) -> Path:
    run = make_run(folder, ["method=snapkv", "budget=128"], None)
    (run / "predictions.jsonl").write_text("".join(
        json.dumps({"id": str(i), "task": "passkey", "pred": pred, "answers": ["7"]}) + "\n"
        for i, pred in enumerate(preds)))
    return run


def test_a_run_without_records_shows_as_missing_in_table_score_and_report(tmp_path, capsys):
    _empty_run(tmp_path / "empty")
    good = _passkey_run(tmp_path / "good", ["7", "8"])
    assert main(["table", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[2:] == ["| random-tiny-llama | snapkv | 128 | 50.00 | 50.00 |",
                                             "| random-tiny-llama | tova | 128 | - | - |"]
    assert f"{tmp_path / 'empty'}: unfinished run (run.json status 'running'); it has no records yet" in captured.err

    assert main(["score", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads((good / "scores.json").read_text())["task_scores"] == {"passkey": 50.0}
    assert f"{tmp_path / 'empty'}: no records yet" in captured.err
    assert not (tmp_path / "empty" / "scores.json").exists()

    assert main(["report", str(tmp_path), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<td>50.00</td>" in page.replace('<td class="">', "<td>") and "it has no records yet" in page


@pytest.mark.parametrize("damage,reason", [
    (lambda run: (run / "predictions.jsonl").write_text('{"id": "0", "task": "passkey"\n'), "corrupt record"),
    (lambda run: (run / "run.json").write_text("{not json"), "not valid JSON"),
    (lambda run: (run / "config.yaml").write_text("method: [unclosed\n"), "cannot be read"),
    (lambda run: (run / "config.yaml").write_text("just a string\n"), "not an evalkv run config"),
])
def test_an_unreadable_run_is_named_and_skipped(tmp_path, capsys, damage, reason):
    _passkey_run(tmp_path / "good", ["7"])
    bad = _passkey_run(tmp_path / "bad", ["7"])
    (bad / "run.json").unlink()  # config.yaml alone then names the run
    damage(bad)
    assert main(["table", str(tmp_path), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1:] == ["random-tiny-llama,snapkv,128,100.0,100.0"]
    [warning] = [line for line in captured.err.splitlines() if str(bad) in line]
    assert "skipped, cannot be read" in warning and reason in warning
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "report.html")]) == 0
    assert "skipped, cannot be read" in (tmp_path / "report.html").read_text()


def test_score_goes_on_past_an_unreadable_run_and_fails_at_the_end(tmp_path, capsys):
    good = _passkey_run(tmp_path / "a", ["7"])
    bad = _passkey_run(tmp_path / "b", ["7"])
    (bad / "predictions.jsonl").write_text('{"id": "0"\n{"id": "1"}\n')
    assert main(["score", "--quiet", str(tmp_path)]) == 2
    assert "b: " in capsys.readouterr().err and (good / "scores.json").exists()
    assert not (bad / "scores.json").exists()


def test_a_folder_of_only_unreadable_runs_is_an_error(tmp_path, capsys):
    (_passkey_run(tmp_path / "bad", ["7"]) / "predictions.jsonl").write_text("[1]\n")
    assert main(["table", str(tmp_path)]) == 2
    assert "skipped, cannot be read" in capsys.readouterr().err


def _ruler_scores(by_length: dict[str, dict[str, float]]) -> dict:
    """scores.json of a RULER run: task -> {length: score}."""
    return {"task_scores": {task: sum(v.values()) / len(v) for task, v in by_length.items()},
            "breakdown": {task: {"by_context_length": v} for task, v in by_length.items()}}


def test_ruler_view_of_a_partial_run_shows_the_lengths_it_lacks_as_missing(tmp_path, capsys):
    """Asked for niah_single_1 and vt at 4096 and 8192; stopped after niah at 8192: 8192 and the average are
    missing (not niah's 0.0 alone), and the length it never reached is shown, not dropped."""
    ruler = ["task=ruler", "task.tasks=[niah_single_1,vt]", "task.lengths=[4096,8192]"]
    make_run(tmp_path / "partial", ["method=snapkv", "budget=128", *ruler],
             _ruler_scores({"niah_single_1": {"4096": 100.0, "8192": 0.0}, "vt": {"4096": 50.0}}), status="running")
    make_run(tmp_path / "stopped", ["method=tova", "budget=128", *ruler], _ruler_scores({"niah_single_1": {
        "4096": 20.0}}), status="interrupted")
    make_run(tmp_path / "passkey", ["method=h2o", "budget=128"], {"task_scores": {"passkey": 10.0}})
    assert main(["table", str(tmp_path), "--view", "ruler", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "model,method,budget,4096,8192,average",
        "random-tiny-llama,snapkv,128,75.0,,",
        "random-tiny-llama,tova,128,,,",
    ]


def test_longbench_e_view_without_longbench_e_runs_says_so(tmp_path, capsys):
    make_run(tmp_path / "lb", *longbench("snapkv", ["hotpotqa"], {"hotpotqa": 40.0}))
    assert main(["table", str(tmp_path), "--view", "longbench_e"]) == 2
    err = capsys.readouterr().err
    assert "no run has LongBench-E tasks, so there is no longbench_e view" in err


def test_longbench_e_view_of_a_run_without_records_is_missing(tmp_path, capsys):
    make_run(tmp_path / "e", *longbench("snapkv", ["hotpotqa_e", "qasper_e"], {}))
    (tmp_path / "e" / "scores.json").write_text(json.dumps({"task_scores": {"hotpotqa_e": 30.0}, "breakdown": {
        "hotpotqa_e": {"by_length": {"0-4k": 40.0, "4-8k": 30.0, "8k+": 20.0}}}}))
    empty = make_run(tmp_path / "empty", longbench("tova", ["hotpotqa_e"], {})[0], None, status="running")
    (empty / "predictions.jsonl").write_text("")
    assert main(["table", str(tmp_path), "--view", "longbench_e", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "model,method,budget,0-4k,4-8k,8k+",
        "random-tiny-llama,snapkv,128,,,",  # qasper_e asked for, never scored
        "random-tiny-llama,tova,128,,,",
    ]


def test_runs_view_has_a_row_per_run_and_counts_every_unfinished_invocation(tmp_path, capsys):
    """Two runs of one model / method / budget (passkey, RULER) are two rows; an invocation that was interrupted,
    failed or killed counts as interrupted, and the recorded wall time of the interrupted one counts."""
    passkey = make_run(tmp_path / "p", ["method=full"], None)
    make_run(tmp_path / "r", ["method=full", "task=ruler", "task.tasks=[vt]"], None)
    info = json.loads((passkey / "run.json").read_text())
    info.update(task="passkey", samples=30, invocations=[
        {"status": "killed", "new_samples": 5},
        {"status": "interrupted", "new_samples": 10, "wall_s": 20.0},
        {"status": "failed", "new_samples": 0, "wall_s": 4.0, "error": "out of memory"},
        {"status": "finished", "new_samples": 15, "wall_s": 18.0}])
    (passkey / "run.json").write_text(json.dumps(info))
    assert main(["table", str(tmp_path), "--view", "runs", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "model,method,budget,task,samples,invocations,interrupted,processes,wall_s,s_per_sample"
    assert rows[1:] == ["random-tiny-llama,full,-,,0.0,0.0,0.0,1.0,0.0,",  # no invocation recorded, no records
                        "random-tiny-llama,full,-,passkey,30.0,4.0,3.0,1.0,42.0,1.68"]  # 42 s for 10 + 15 samples
