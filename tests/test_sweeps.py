"""The sweep scripts (scripts/*.sh), the acceptance sweep (three methods x budgets on passkey, then table, curves and
report) and the SLURM launcher config."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evalkv.cli import main
from evalkv.records import read_records
from evalkv.tasks.ruler.constants import ESSAY_TASKS, RULER_TASKS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BENCHMARK_SCRIPTS = ["longbench.sh", "ruler.sh", "needle.sh"]

# Stands in for `evalkv`: logs each call; `pred` prints a run directory unless its arguments name a failing method.
FAKE_EVALKV = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [[ $1 == pred ]]; then
  [[ " $* " == *" method=broken "* ]] && exit 2
  dir="$FAKE_ROOT/$(echo "${*:2}" | tr ' /[]=' '_____' | cut -c1-200)"
  mkdir -p "$dir" && echo "$dir"
fi
"""


def _script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.parametrize("name", ["sweep_budgets.sh", "leaderboard.sh", *BENCHMARK_SCRIPTS])
def test_sweep_scripts_explain_their_usage(name):
    without_arguments = _script(name)
    assert without_arguments.returncode == 2 and "usage: scripts/" + name in without_arguments.stdout
    assert _script(name, "--help").returncode == 0


@pytest.fixture
def fake_evalkv(tmp_path):
    program = tmp_path / "evalkv"
    program.write_text(FAKE_EVALKV)
    program.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"EVALKV": str(program), "FAKE_LOG": str(log), "FAKE_ROOT": str(tmp_path / "runs"), "TASKS": ""}
    return env, log


def test_benchmark_sweep_runs_full_once_every_method_budget_and_task_then_scores(tmp_path, fake_evalkv):
    env, log = fake_evalkv
    (tmp_path / "out").mkdir()
    done = _script("longbench.sh", "full,snapkv,broken", "128,512", f"output_dir={tmp_path / 'out'}",
                   env={**env, "TASKS": "hotpotqa,qasper"})
    calls = log.read_text().splitlines()
    preds = [call for call in calls if call.startswith("pred ")]
    assert len(preds) == 2 + 2 * 2 * 2  # full once per task; snapkv and broken per budget and task
    assert sum("method=full" in call and "budget=" not in call for call in preds) == 2
    assert "pred task=longbench method=snapkv progress=false budget=512 task.tasks=[qasper] " \
           f"output_dir={tmp_path / 'out'}" in preds
    score = next(call for call in calls if call.startswith("score "))
    assert score.count("method_snapkv") == 4 and "broken" not in score  # every run that worked is scored
    assert f"table {tmp_path / 'out'}" in calls
    assert done.returncode == 1 and "evalkv pred task=longbench method=broken" in done.stderr  # failures named


@pytest.mark.parametrize("name,extra", [("ruler.sh", "--view ruler"), ("needle.sh", "plot needle")])
def test_ruler_and_needle_sweeps_add_their_views(tmp_path, fake_evalkv, name, extra):
    env, log = fake_evalkv
    (tmp_path / "out").mkdir()
    assert _script(name, "snapkv", "64", f"output_dir={tmp_path / 'out'}", env=env).returncode == 0
    calls = log.read_text().splitlines()
    assert f"task={name.removesuffix('.sh')}" in calls[0] and any(extra in call for call in calls)


def _script_list(name: str) -> list[str]:
    """A comma-separated list the leaderboard script assigns (and extends with `+=,...`)."""
    text = (SCRIPTS / "leaderboard.sh").read_text()
    return "".join(re.findall(rf"^{name}\+?=(\S+)$", text, flags=re.M)).split(",")


def test_leaderboard_script_knows_rulers_tasks():
    assert _script_list("RULER_TASKS") == list(RULER_TASKS)
    assert _script_list("ESSAY_TASKS") == list(ESSAY_TASKS)


def test_leaderboard_script_runs_the_protocol_then_its_table_and_plot(tmp_path, fake_evalkv):
    env, log = fake_evalkv
    out = tmp_path / "out"
    out.mkdir()
    done = _script("leaderboard.sh", "full,snapkv", "task.essay_path=essays.json", f"output_dir={out}", env=env)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    synthetic = ",".join(task for task in RULER_TASKS if not task.startswith("qa_"))
    assert calls[0] == ("pred --multirun method=full,snapkv compression_ratio=0.25,0.5,0.75,0.875 task=ruler "
                        f"model=llama3.1-8b-instruct task.lengths=[4096] task.tasks=[{synthetic}] progress=false "
                        f"compress=context task.essay_path=essays.json output_dir={out}")
    assert calls[1:] == [f"score --quiet {out}", f"table {out}",
                         f"table {out} --view leaderboard --format csv -o {out}/leaderboard.csv",
                         f"plot curves {out} --tasks RULER -o {out}/leaderboard.png --title RULER at 4096 tokens, "
                         "llama3.1-8b-instruct: score versus compression ratio",
                         f"table {out} --view leaderboard"]
    assert "qa_1 / qa_2 left out" in done.stderr


def test_leaderboard_script_takes_qa_data_model_ratios_and_samples(tmp_path, fake_evalkv):
    env, log = fake_evalkv
    env = {**env, "MODEL": "qwen3-8b", "RATIOS": "0.1,0.9", "SAMPLES": "50", "LEADERBOARD_QUERY_AGNOSTIC": "X=1"}
    assert _script("leaderboard.sh", "snapkv", "task.essay_path=e", "task.squad_path=s", "task.hotpotqa_path=h",
                   f"output_dir={tmp_path}", env=env).returncode == 0
    pred = log.read_text().splitlines()[0]
    assert "compression_ratio=0.1,0.9 task=ruler model=qwen3-8b" in pred and "task.num_samples=50 X=1" in pred
    assert f"task.tasks=[{','.join(RULER_TASKS)}]" in pred


def test_leaderboard_script_runs_methods_in_parallel_processes_each_into_its_folder(tmp_path, fake_evalkv):
    env, log = fake_evalkv
    out = tmp_path / "out"
    out.mkdir()
    done = _script("leaderboard.sh", "full,snapkv,knorm", f"output_dir={out}", "batch_size=4",
                   env={**env, "TASKS": "vt", "PARALLEL": "2"})
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    preds = sorted(call for call in calls if call.startswith("pred "))
    assert preds == [f"pred --multirun method={method} compression_ratio=0.25,0.5,0.75,0.875 task=ruler "
                     f"model=llama3.1-8b-instruct task.lengths=[4096] task.tasks=[vt] progress=false "
                     f"compress=context batch_size=4 output_dir={out}/{method}"
                     for method in ("full", "knorm", "snapkv")]
    assert calls[3:5] == [f"score --quiet {out}", f"table {out}"]  # the tables wait for every process
    refused = _script("leaderboard.sh", "snapkv", f"output_dir={out}", env={**env, "TASKS": "vt", "PARALLEL": "two"})
    assert refused.returncode == 2 and "PARALLEL must be a positive number of processes" in refused.stderr


def test_leaderboard_script_needs_the_essays_for_the_essay_tasks(tmp_path, fake_evalkv):
    env, log = fake_evalkv
    refused = _script("leaderboard.sh", "snapkv", env=env)
    assert refused.returncode == 2 and "niah_single_2 reads Paul Graham's essays: give task.essay_path=" in \
        refused.stderr
    assert not log.exists()  # nothing ran
    chosen = _script("leaderboard.sh", "snapkv", f"output_dir={tmp_path}", env={**env, "TASKS": "niah_single_1,vt"})
    assert chosen.returncode == 0 and "task.tasks=[niah_single_1,vt]" in log.read_text()


@pytest.mark.heavy
def test_acceptance_leaderboard_protocol_on_the_tiny_model(tmp_path, capsys):
    """The leaderboard script for real: full and SnapKV at two compression ratios on two RULER tasks, then its
    leaderboard.csv / .md and plot. Random weights score 0, so the test then plants the answers of one record and
    checks the leaderboard score against that run's own task scores."""
    output = tmp_path / "results"
    env = {"EVALKV": f"{sys.executable} -m evalkv.cli", "PYTHONPATH": str(REPO), "MODEL": "random-tiny-llama",
           "LENGTH": "1024", "TASKS": "niah_single_1,fwe", "SAMPLES": "1", "RATIOS": "0.5,0.75"}
    done = _script("leaderboard.sh", "full,snapkv", "model.device=cpu", f"task.cache_dir={tmp_path / 'cache'}",
                   f"output_dir={output}", env=env)
    assert done.returncode == 0, done.stderr
    runs = {run.parent.name: run.parent for run in output.rglob("predictions.jsonl")}
    assert sorted(runs) == ["full", "snapkv_r0.5", "snapkv_r0.75"]
    labels = json.loads((runs["snapkv_r0.5"] / "run.json").read_text())["labels"]
    assert labels["query"] == "agnostic"  # the context compressed without the question, as the leaderboard does
    rows = list(csv.reader(io.StringIO((output / "leaderboard.csv").read_text())))
    assert rows == [["dataset", "data_dir", "model", "method", "compression_ratio", "score"],
                    ["ruler", "1024", "random-tiny-llama", "full", "0.0", "0.0"],
                    ["ruler", "1024", "random-tiny-llama", "snapkv", "0.5", "0.0"],
                    ["ruler", "1024", "random-tiny-llama", "snapkv", "0.75", "0.0"]]
    assert (output / "leaderboard.md").read_text().startswith("| dataset | data_dir | model | method |")
    assert (output / "leaderboard.png").read_bytes().startswith(b"\x89PNG")

    records = read_records(runs["snapkv_r0.5"] / "predictions.jsonl")
    planted = next(record for record in records if record["task"] == "niah_single_1")
    planted["pred"] = " ".join(planted["answers"])
    (runs["snapkv_r0.5"] / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["score", "--quiet", str(output)]) == 0
    task_scores = json.loads((runs["snapkv_r0.5"] / "scores.json").read_text())["task_scores"]
    assert task_scores["niah_single_1"] == 100.0
    capsys.readouterr()
    assert main(["table", str(output), "--view", "leaderboard", "--format", "csv"]) == 0
    row = next(row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))
               if row["compression_ratio"] == "0.5")
    assert float(row["score"]) == round((task_scores["niah_single_1"] + task_scores["fwe"]) / 2, 2)


def _rows(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["table", *args, "--format", "csv"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


@pytest.mark.heavy
def test_acceptance_budget_sweep_then_table_curves_and_report(tmp_path, capsys):
    """Three methods x two budgets (+ the full cache) on passkey with a tiny random model, run by the script.
    Random weights score 0 everywhere, so the test plants correct answers in some records (a different number per
    run) and re-scores: every table cell must then equal its run's scores.json, and a run stopped before its first
    record must stay in the table as a row of missing cells."""
    output = tmp_path / "results"
    env = {"EVALKV": f"{sys.executable} -m evalkv.cli", "PYTHONPATH": str(REPO)}
    swept = _script("sweep_budgets.sh", "full,snapkv,streaming_llm,h2o", "32,64", "model=random-tiny-llama",
                    "model.device=cpu", "task.lengths=[256]", "task.depths=[0,25,50,75,100]", f"output_dir={output}",
                    env=env)
    assert swept.returncode == 0, swept.stderr
    runs = sorted(path.parent for path in output.rglob("predictions.jsonl"))
    assert sorted(run.name for run in runs) == ["full", "h2o_32", "h2o_64", "snapkv_32", "snapkv_64",
                                                "streaming_llm_32", "streaming_llm_64"]
    for planted, run in enumerate(runs[:6]):
        records = read_records(run / "predictions.jsonl")
        for record in records[:planted % 5 + 1]:
            record["pred"] = record["answers"][0]
        (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stopped = runs[6]
    (stopped / "predictions.jsonl").unlink()
    (stopped / "scores.json").unlink()
    (stopped / "run.json").write_text(json.dumps({"status": "running"}))
    assert main(["score", "--quiet", str(output)]) == 0

    rows = _rows(capsys, str(output))
    assert len(rows) == 7
    for run in runs[:6]:
        scores = json.loads((run / "scores.json").read_text())
        method, _, budget = run.name.rpartition("_")
        row = next(r for r in rows if (r["method"], r["budget"]) == ((method, budget) if method else ("full", "-")))
        assert float(row["passkey"]) == scores["task_scores"]["passkey"] > 0
    stopped_row = next(r for r in rows if (r["method"], r["budget"]) == ("streaming_llm", "64"))
    assert stopped_row["passkey"] == "" and stopped_row["average"] == ""

    assert main(["plot", "curves", str(output), "-o", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert main(["report", str(output), "-o", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    for row in rows:
        if row["passkey"]:
            assert f"<td>{float(row['passkey']):.2f}</td>" in page.replace(' class=""', "")
    figure = r'<img alt="Score versus budget \(shaded: 95% intervals\)" src="data:image/png;base64,'
    assert len(re.findall(figure, page)) == 1
    assert "unfinished run" in page


LAUNCHER = REPO / "configs" / "hydra" / "launcher" / "slurm.yaml"


def test_slurm_launcher_config_is_documented_yaml():
    text = LAUNCHER.read_text()
    config = yaml.safe_load(text)
    assert config["defaults"] == ["submitit_slurm"] and config["gpus_per_node"] == 1
    assert "hydra/launcher=slurm" in text and "evalkv[slurm]" in text
    assert "hydra/launcher=slurm" in (REPO / "README.md").read_text()


def test_slurm_launcher_composes_with_the_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed (pip install 'evalkv[slurm]')")
    from hydra import compose, initialize_config_dir

    from evalkv.config import register_configs
    from evalkv.paths import configs_dir

    register_configs()
    with initialize_config_dir(str(configs_dir()), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "method=snapkv",
                                           "budget=128"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert cfg.method.budget == 128
