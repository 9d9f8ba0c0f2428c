"""The `evalkv` command: runs, resumption (also after SIGKILL), scoring, tables and every bad-input path."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from signal_after import run_signalled

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.records import read_records
from evalkv.run.invocations import git_state

TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false"]
TIMING = {"prefill_s", "decode_s", "decode_batch"}  # how a sample ran, not what it produced


def _pred(tmp_path: Path, *overrides: str) -> int:
    return main(["pred", *TINY, f"output_dir={tmp_path / 'results'}", *overrides])


def _only_run_dir(root: Path) -> Path:
    runs = [p.parent for p in root.rglob("predictions.jsonl")]
    assert len(runs) == 1, runs
    return runs[0]


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in records]


def test_pred_writes_the_contract_files_and_prints_the_run_dir(tmp_path, capsys):
    assert _pred(tmp_path, "method=snapkv", "budget=64", "method.window_size=8", "task.lengths=[256]") == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    run = Path(printed)
    assert run == _only_run_dir(tmp_path / "results")
    assert {p.name for p in run.iterdir()} == {"config.yaml", "predictions.jsonl", "run.json"}
    records = read_records(run / "predictions.jsonl")
    assert len(records) == 5
    required = {"id", "task", "pred", "answers", "all_classes", "length", "prompt_tokens", "new_tokens",
                "kept_tokens", "prefill_s", "decode_s", "context_length", "depth"}
    assert all(required <= set(record) for record in records)
    assert all(record["kept_tokens"] == 64 for record in records)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["samples"] == 5 and info["transformers"]
    assert "snapkv" in (run / "config.yaml").read_text()


def test_rerun_resumes_and_skips_finished_samples(tmp_path):
    args = ["method=tova", "budget=32", "task.lengths=[256]"]
    assert _pred(tmp_path, *args, "task.n_samples=2") == 0
    run = _only_run_dir(tmp_path / "results")
    first = read_records(run / "predictions.jsonl")
    assert _pred(tmp_path, *args) == 0
    records = read_records(run / "predictions.jsonl")
    assert len(records) == 5 and records[:2] == first
    assert _pred(tmp_path, *args) == 0
    assert read_records(run / "predictions.jsonl") == records
    invocations = json.loads((run / "run.json").read_text())["invocations"]
    assert [i["new_samples"] for i in invocations] == [2, 3, 0]


def test_a_sweeps_budget_does_not_split_the_full_cache_run(tmp_path):
    """full has no budget: `budget=` from a sweep must resume its one run, not refuse it as a different config."""
    args = ["method=full", "task.lengths=[256]", "task.n_samples=2"]
    assert _pred(tmp_path, *args, "budget=64") == 0
    run = _only_run_dir(tmp_path / "results")
    assert _pred(tmp_path, *args[:2], "budget=128") == 0
    assert _only_run_dir(tmp_path / "results") == run and len(read_records(run / "predictions.jsonl")) == 5


def test_rerunning_a_finished_run_does_not_load_the_model(tmp_path, monkeypatch):
    args = ["method=snapkv", "budget=48", "method.window_size=8", "task.lengths=[256]", "task.n_samples=3"]
    assert _pred(tmp_path, *args) == 0
    run = _only_run_dir(tmp_path / "results")
    records = read_records(run / "predictions.jsonl")

    loads = []

    def refuse(cfg):
        loads.append(cfg)
        raise EvalkvError("the model was needed")

    monkeypatch.setattr("evalkv.run.pred.cached_model", refuse)
    assert _pred(tmp_path, *args) == 0
    assert _pred(tmp_path, *args[:-1], "task.n_samples=2") == 0  # fewer samples: still complete
    assert loads == [] and read_records(run / "predictions.jsonl") == records
    invocations = json.loads((run / "run.json").read_text())["invocations"]
    assert [i["new_samples"] for i in invocations] == [3, 0, 0]
    assert _pred(tmp_path, *args[:-1], "task.n_samples=4") != 0  # more samples: the model is needed
    assert len(loads) == 1


def test_batched_run_writes_the_records_of_an_unbatched_run(tmp_path):
    args = ["method=snapkv", "budget=48", "method.window_size=8", "task.lengths=[256,300]", "task.depths=[0,50]"]
    assert _pred(tmp_path / "one", *args, "batch_size=1") == 0
    assert _pred(tmp_path / "four", *args, "batch_size=4") == 0
    alone = read_records(_only_run_dir(tmp_path / "one" / "results") / "predictions.jsonl")
    batched = read_records(_only_run_dir(tmp_path / "four" / "results") / "predictions.jsonl")
    assert len(alone) == 4 and _without_timing(batched) == _without_timing(alone)
    assert [r["decode_batch"] for r in alone] == [1] * 4
    assert [r["decode_batch"] for r in batched] == [4] * 4


@pytest.mark.heavy
def test_compiled_decoding_resumes_an_ordinary_run_with_the_same_records(tmp_path, traced_compile):
    """decode_graphs may change when a run resumes: samples decoded by a compiled step join those decoded ordinarily,
    with the same predictions; each record says how it decoded."""
    args = ["method=snapkv", "budget=48", "method.window_size=8", "task.lengths=[256]", "batch_size=2"]
    assert _pred(tmp_path / "off", *args) == 0
    assert _pred(tmp_path / "mixed", *args, "task.n_samples=2") == 0
    assert _pred(tmp_path / "mixed", *args, "decode_graphs=compile") == 0
    expected = read_records(_only_run_dir(tmp_path / "off" / "results") / "predictions.jsonl")
    mixed = read_records(_only_run_dir(tmp_path / "mixed" / "results") / "predictions.jsonl")
    how = TIMING | {"decode_compiled"}
    assert [{k: v for k, v in r.items() if k not in how} for r in mixed] == [
        {k: v for k, v in r.items() if k not in how} for r in expected]
    assert [r["decode_compiled"] for r in mixed] == [False, False, True, True, True]


@pytest.mark.heavy
def test_run_killed_with_sigkill_resumes_to_identical_records(tmp_path):
    overrides = [*TINY, "method=h2o", "budget=48", "task.lengths=[512]", "task.depths=[0,10,20,30,40,50,60,70,80,90]"]
    reference = tmp_path / "reference"
    assert main(["pred", *overrides, f"output_dir={reference}"]) == 0
    expected = read_records(_only_run_dir(reference) / "predictions.jsonl")
    assert len(expected) == 10

    killed = tmp_path / "killed"
    died = run_signalled(5, "SIGKILL", ["pred", *overrides, f"output_dir={killed}"])
    assert died.returncode == -signal.SIGKILL, died.stderr
    predictions = _only_run_dir(killed) / "predictions.jsonl"
    assert predictions.read_text().count("\n") == 5
    assert json.loads((predictions.parent / "run.json").read_text())["status"] == "running"  # nobody said otherwise

    assert main(["pred", *overrides, f"output_dir={killed}"]) == 0  # resumes
    assert _without_timing(read_records(predictions)) == _without_timing(expected)


def test_score_and_table(tmp_path, capsys):
    for method in ("full", "snapkv", "streaming_llm"):
        assert _pred(tmp_path, f"method={method}", "budget=64", "task.lengths=[256]", "task.depths=[0,100]",
                     *(["method.window_size=8"] if method == "snapkv" else [])) == 0
    runs = sorted(p.parent for p in (tmp_path / "results").rglob("predictions.jsonl"))
    capsys.readouterr()
    assert main(["score", *map(str, runs)]) == 0
    assert capsys.readouterr().out.count("passkey_accuracy") == 3
    expected = {}
    for run in runs:
        scores = json.loads((run / "scores.json").read_text())
        records = read_records(run / "predictions.jsonl")
        hits = [re.search(r"\d+", r["pred"]) for r in records]
        correct = [float(h is not None and int(h.group()) == int(r["answers"][0])) for h, r in zip(hits, records)]
        assert scores["task_scores"]["passkey"] == round(100 * sum(correct) / len(correct), 2)
        assert scores["n"] == {"passkey": 2}
        assert set(scores["breakdown"]["passkey"]["by_depth"]) == {"0", "100"}
        expected[run.name.split("_")[0]] = scores["task_scores"]["passkey"]

    assert main(["table", str(tmp_path / "results"), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.strip().splitlines()
    assert csv[0] == "model,method,budget,passkey,average"
    rows = [line.split(",") for line in csv[1:]]
    assert [(row[1], row[2]) for row in rows] == [("full", "-"), ("snapkv-window_size=8", "64"),
                                                  ("streaming_llm", "64")]
    assert [float(row[3]) for row in rows] == [expected["full"], expected["snapkv"], expected["streaming"]]


def test_score_accepts_a_foreign_predictions_file(tmp_path, capsys):
    path = tmp_path / "elsewhere.jsonl"
    path.write_text('{"task": "passkey", "pred": " 42.", "answers": ["42"]}\n'
                    '{"task": "passkey", "pred": "41", "answers": ["42"]}\n')
    assert main(["score", str(path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["task_scores"] == {"passkey": 50.0} and scores["average"] == 50.0


def test_table_shows_missing_cells_as_missing(tmp_path, capsys):
    for name, tasks in (("a", {"passkey": 50.0}), ("b", {"passkey": 25.0, "other": 10.0})):
        run = tmp_path / name
        run.mkdir()
        (run / "scores.json").write_text(json.dumps({"task_scores": tasks}))
    assert main(["table", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| ? | a | - | - | 50.00 | - |"
    assert lines[3] == "| ? | b | - | 10.00 | 25.00 | 17.50 |"


@pytest.mark.parametrize("args,message", [
    (["pred", "method=snapkvv"], "unknown method 'snapkvv' (did you mean 'snapkv'?); known: "),
    (["pred", "model=llama9"], "unknown model 'llama9' (did you mean 'llama3'?); known:"),
    (["pred", "task=passkee"], "unknown task 'passkee' (did you mean 'passkey'?); known: aime, gsm8k, longbench, "
     "longbench_v2, longgenbench_gsm8k, math500, minilongbench, needle, passkey, perplexity, ruler"),
    (["pred", *TINY, "method=snapkv", "budget=0"], "budget must be a positive number"),
    (["pred", *TINY, "method=snapkv", "budget=-3"], "budget must be a positive number"),
    (["pred", *TINY, "method=snapkv", "budget=8", "batch_size=0"], "batch_size must be at least 1"),
    (["pred", *TINY, "method=snapkv", "budget=8", "decode_graphs=always"],
     "unknown decode_graphs 'always'; known: auto, off, eager, compile"),
    (["pred", *TINY, "method=snapkv"], "needs a budget"),
    (["pred", "model=hf", "model.path=./no/such/folder"], "does not exist"),
    (["pred", "model=gguf", "model.path=/no/such/model.gguf"], "not found"),
    (["pred", *TINY, "method=snapkv", "budget=64", "method.window=3"],
     "method 'snapkv' has no option 'window' (did you mean 'window_size'?); its options: beta, budget, "),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["score", "/no/such/run"], "does not exist"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, args, message):
    if args[0] == "pred":
        args = [*args, f"output_dir={tmp_path / 'results'}"]
    code = main(args)
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "+method" not in err
    if message:
        assert message in err
    if message and message.startswith("unknown method"):
        assert ", snapkv, " in err and err.rstrip().endswith("(evalkv list methods)")
    assert not (tmp_path / "results").exists()


def test_corrupt_record_stops_resume_and_score_with_its_line_number(tmp_path, capsys):
    assert _pred(tmp_path, "method=full", "task.lengths=[256]", "task.n_samples=3") == 0
    run = _only_run_dir(tmp_path / "results")
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"id": "broken",\n'
    (run / "predictions.jsonl").write_text("".join(lines))
    before = (run / "predictions.jsonl").read_bytes()
    capsys.readouterr()
    assert _pred(tmp_path, "method=full", "task.lengths=[256]") == 2
    assert "predictions.jsonl:2: corrupt record" in capsys.readouterr().err
    assert (run / "predictions.jsonl").read_bytes() == before
    assert main(["score", str(run)]) == 2
    assert "predictions.jsonl:2: corrupt record" in capsys.readouterr().err
    assert not (run / "scores.json").exists()


def test_resuming_with_a_different_config_is_refused(tmp_path, capsys):
    assert _pred(tmp_path, "method=snapkv", "budget=64", "task.lengths=[256]", "task.n_samples=1",
                 "run_dir=" + str(tmp_path / "run")) == 0
    assert _pred(tmp_path, "method=snapkv", "budget=96", "task.lengths=[256]", "run_dir=" + str(tmp_path / "run")) == 2
    assert "holds a run with a different config" in capsys.readouterr().err
    assert len(read_records(tmp_path / "run" / "predictions.jsonl")) == 1


def test_list_prints_one_name_per_line(capsys):
    assert main(["list", "methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"full", "snapkv", "streaming_llm", "h2o", "tova", "sliding_window", "sink_recent_uniform"} <= set(names)
    assert main(["list", "models"]) == 0
    assert "qwen2.5-coder-0.5b-instruct" in [line.split()[0] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("command", ["pred", "score", "table", "plot", "report", "list", "demo", "data", "bench",
                                     "headmask", "train-policy"])
def test_every_command_has_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_table_views_show_timing_and_breakdowns(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"task": "passkey", "pred": "7", "answers": ["7"], "context_length": 1024, "depth": 0.0,
             "prefill_s": 0.5, "decode_s": 0.25},
            {"task": "passkey", "pred": "8", "answers": ["7"], "context_length": 2048, "depth": 50.0,
             "prefill_s": 1.5, "decode_s": 0.75}]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["table", str(run), "--view", "timing", "--format", "csv"]) == 0
    timing = capsys.readouterr().out.splitlines()
    assert timing[0] == "model,method,budget,passkey/decode_s,passkey/prefill_s"
    assert timing[1].endswith(",0.5,1.0")
    assert main(["table", str(run), "--view", "by_context_length", "--format", "csv"]) == 0
    lengths = capsys.readouterr().out.splitlines()
    assert lengths[0].endswith("passkey/1024,passkey/2048") and lengths[1].endswith(",100.0,0.0")
    assert main(["table", str(run), "--view", "by_nothing"]) == 2
    assert "no run has a 'by_nothing' view" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_state_names_the_commit_and_whether_tracked_files_differ(tmp_path, tmp_path_factory, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not part of the checkout\n")
    assert git_state(tmp_path) == {"git": head, "git_dirty": False}
    (tmp_path / "a.txt").write_text("two\n")
    assert git_state(tmp_path) == {"git": head, "git_dirty": True}
    outside = tmp_path_factory.mktemp("not_a_checkout")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(outside.parent))  # git must not find a repository above it
    assert git_state(outside) == {"git": None, "git_dirty": None}


def test_table_runs_view_sums_the_recorded_wall_time_and_counts_interrupted_invocations(tmp_path, capsys):
    """Two invocations: a killed one (no wall time; its records stay) and a data-parallel one that wrote 30 samples in
    45 s. wall_s is the recorded 45 s, per sample 45 / 30 = 1.5; the killed one is counted, not guessed."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"task": "passkey", "pred": "7", "answers": ["7"]}] * 40
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run.json").write_text(json.dumps({"status": "finished", "samples": 40, "invocations": [
        {"started": "t0", "new_samples": 0},
        {"started": "t1", "new_samples": 30, "processes": 2, "wall_s": 45.0}]}))
    assert main(["table", str(run), "--view", "runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| samples | invocations | interrupted | processes | wall_s | s_per_sample |")
    assert lines[2].endswith("| 40 | 2 | 1 | 2 | 45.00 | 1.50 |")


def test_score_a_folder_of_runs_scores_each_run(tmp_path, capsys):
    for name in ("a", "b/c"):
        run = tmp_path / name
        run.mkdir(parents=True)
        (run / "predictions.jsonl").write_text('{"task": "passkey", "pred": "1", "answers": ["1"]}\n')
    assert main(["score", "--quiet", str(tmp_path)]) == 0
    assert sorted(p.parent.name for p in tmp_path.rglob("scores.json")) == ["a", "c"]
    assert main(["score", str(tmp_path / "b" / "c" / "nothing")]) == 2


def test_multirun_flag_may_follow_the_overrides(tmp_path, capsys):
    assert _pred(tmp_path, "method=snapkv,tova", "budget=64", "task.lengths=[256]", "task.n_samples=1",
                 "--multirun") == 0
    assert sorted(p.parent.name for p in (tmp_path / "results").rglob("predictions.jsonl")) == ["snapkv_64",
                                                                                               "tova_64"]
    jobs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evalkv pred: job")]
    assert jobs == ["evalkv pred: job 1/2: method=snapkv", "evalkv pred: job 2/2: method=tova"]
