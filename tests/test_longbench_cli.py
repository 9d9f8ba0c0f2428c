"""`evalkv pred task=longbench|minilongbench` on a tiny random model, then `evalkv score`, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from longbench_fixtures import small_longbench

from evalkv.cli import main
from evalkv.records import read_records

TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false"]


def _run(tmp_path: Path, capsys, *overrides: str) -> Path:
    assert main(["pred", *TINY, f"output_dir={tmp_path / 'results'}", *overrides]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_longbench_run_and_score(tmp_path, capsys):
    data = small_longbench(tmp_path / "data")
    common = ["task=longbench", f"task.data_dir={data}", "task.check_row_counts=false", "task.samples_per_task=1",
              "method=snapkv", "budget=64", "method.window_size=8"]
    run = _run(tmp_path, capsys, *common, "task.tasks=[hotpotqa,samsum,trec,hotpotqa_e]")
    assert "data_dir" not in str(run) and run.name == "snapkv_64-window_size=8"
    records = read_records(run / "predictions.jsonl")
    assert [r["task"] for r in records] == ["hotpotqa", "samsum", "trec", "hotpotqa_e"]
    assert [r["id"] for r in records][0] == "hotpotqa/hotpotqa-0000"
    assert all(r["query_aware"] and r["max_prompt_length"] is None and not r["truncated"] for r in records)
    assert [r["chat_template"] for r in records] == [True, False, False, True]
    assert records[0]["new_tokens"] <= 32 and records[1]["new_tokens"] <= 128 and records[2]["new_tokens"] <= 64
    assert records[0]["length"] == 1000 and records[0]["answers"] == ["Alice Smith"]
    assert records[2]["all_classes"] == ["City", "Individual", "Other location"]

    agnostic = _run(tmp_path, capsys, *common, "task.tasks=[hotpotqa]", "compress=context")
    assert agnostic.parent.parent.name == "longbench-compress=context-tasks=hotpotqa-check_row_counts=False"
    (split,) = read_records(agnostic / "predictions.jsonl")
    assert not split["query_aware"] and split["prompt_tokens"] == records[0]["prompt_tokens"]
    assert (split["compress"], records[0]["compress"]) == ("context", "prompt")
    assert json.loads((agnostic / "run.json").read_text())["labels"]["query"] == "agnostic"

    assert main(["score", str(run)]) == 0
    scores = json.loads((run / "scores.json").read_text())
    assert set(scores["task_scores"]) == {"hotpotqa", "samsum", "trec", "hotpotqa_e"}
    assert scores["metric"]["hotpotqa_e"] == "qa_f1_score" and scores["n"]["samsum"] == 1
    assert set(scores["groups"]) == {"longbench", "longbench_e"}
    assert set(scores["groups"]["longbench"]["categories"]) == {"Multi-Doc QA", "Few-shot"}
    assert scores["breakdown"]["hotpotqa_e"]["by_length"]["0-4k"] == scores["task_scores"]["hotpotqa_e"]
    assert "longbench (3 tasks): average" in capsys.readouterr().out


@pytest.mark.skipif(not (SHARED_DATA / "minilongbench").is_dir(), reason="MiniLongBench is not in ../shared/data")
def test_minilongbench_run_truncates_long_prompts(tmp_path, capsys):
    run = _run(tmp_path, capsys, "task=minilongbench", f"task.data_dir={SHARED_DATA / 'minilongbench'}",
               "task.tasks=[trec,multifieldqa_zh]", "task.samples_per_task=1", "model.max_prompt_length=400",
               "method=streaming_llm", "budget=64")
    records = read_records(run / "predictions.jsonl")
    assert [r["id"] for r in records] == ["trec/0", "multifieldqa_zh/0"]
    assert all(r["truncated"] and r["max_prompt_length"] == 400 for r in records)
    assert [r["chat_template"] for r in records] == [False, True]
    assert records[0]["prompt_tokens"] <= 400 and records[0]["all_classes"][0] == "Food"
    assert main(["score", str(run)]) == 0
    assert set(json.loads((run / "scores.json").read_text())["task_scores"]) == {"trec", "multifieldqa_zh"}


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["pred", *TINY, "task=longbench", f"output_dir={tmp_path}"]) == 2
    assert "longbench needs task.data_dir" in capsys.readouterr().err
    assert main(["pred", *TINY, "task=minilongbench", f"task.data_dir={tmp_path}", f"output_dir={tmp_path}"]) == 2
    assert "MiniLongBench file for narrativeqa not found" in capsys.readouterr().err
    assert not list(tmp_path.rglob("predictions.jsonl"))


def test_data_command_has_help(capsys):
    for args in (["data", "--help"], ["data", "longbench", "--help"], ["data", "minilongbench-to-jsonl", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0 and "usage: evalkv data" in capsys.readouterr().out
