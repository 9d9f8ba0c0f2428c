"""How an `evalkv pred` invocation ends, and what it tells the person who ran it: run.json records every ending
(finished, interrupted by SIGINT / SIGTERM, failed, killed), Ctrl-C is one line on stderr, a task that cannot make
its samples fails before anything is written, and a finished run says what it did."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from signal_after import run_signalled

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.records import read_records

TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false", "method=snapkv", "budget=48",
        "method.window_size=8", "task.lengths=[256]", "task.depths=[0,50,100]", "batch_size=1"]


def _pred(tmp_path: Path, *overrides: str) -> int:
    return main(["pred", *TINY, f"output_dir={tmp_path / 'results'}", *overrides])


def _run_dir(tmp_path: Path) -> Path:
    [info] = (tmp_path / "results").rglob("run.json")
    return info.parent


def _info(tmp_path: Path) -> dict:
    return json.loads((_run_dir(tmp_path) / "run.json").read_text())


def _stop_on_second_batch(monkeypatch, stop) -> None:
    """Engine.generate_batch runs the first batch, then `stop()` happens during the second."""
    original, calls = Engine.generate_batch, []

    def generate_batch(self, requests, max_batch=None, **kwargs):
        calls.append(len(requests))
        if len(calls) == 2:
            stop()
        return original(self, requests, max_batch, **kwargs)

    monkeypatch.setattr(Engine, "generate_batch", generate_batch)


def _interrupt():
    raise KeyboardInterrupt


def _terminate():
    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode, inside this batch
    raise AssertionError("SIGTERM did not stop the run")


@pytest.mark.parametrize("stop,name,code", [(_interrupt, "SIGINT", 130), (_terminate, "SIGTERM", 143)])
def test_a_signal_ends_the_run_with_one_line_and_run_json_says_how_far_it_got(tmp_path, monkeypatch, capsys, stop,
                                                                              name, code):
    handler = signal.getsignal(signal.SIGTERM)
    _stop_on_second_batch(monkeypatch, stop)
    assert _pred(tmp_path) == code
    run = _run_dir(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"evalkv pred: interrupted after 1 of 3 samples; run the same command again to resume "
                       f"({run})")
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is evalkv pred's only while it runs
    info = _info(tmp_path)
    assert info["status"] == "interrupted" and info["samples"] == 1
    [invocation] = info["invocations"]
    assert invocation["status"] == "interrupted" and invocation["signal"] == name
    assert invocation["new_samples"] == 1 and invocation["finished"] and invocation["wall_s"] >= 0
    assert len(read_records(run / "predictions.jsonl")) == 1

    monkeypatch.undo()
    assert _pred(tmp_path) == 0
    info = _info(tmp_path)
    assert info["status"] == "finished" and info["samples"] == 3
    assert [(i["status"], i["new_samples"]) for i in info["invocations"]] == [("interrupted", 1), ("finished", 2)]


def test_an_exception_is_recorded_as_failed_with_its_message(tmp_path, monkeypatch, capsys):
    def fail():
        raise EvalkvError("the GPU went away")

    _stop_on_second_batch(monkeypatch, fail)
    assert _pred(tmp_path) == 2
    assert "evalkv pred: error: the GPU went away" in capsys.readouterr().err
    info = _info(tmp_path)
    assert info["status"] == "failed" and info["error"] == "the GPU went away" and info["samples"] == 1
    [invocation] = info["invocations"]
    assert (invocation["status"], invocation["error"], invocation["new_samples"]) == ("failed", "the GPU went away", 1)

    monkeypatch.undo()
    assert _pred(tmp_path) == 0
    info = _info(tmp_path)
    assert info["status"] == "finished" and "error" not in info
    assert [i["status"] for i in info["invocations"]] == ["failed", "finished"]


def test_an_invocation_that_never_recorded_its_end_is_marked_killed_or_unknown(tmp_path):
    assert _pred(tmp_path, "task.n_samples=1") == 0
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = _info(tmp_path)
    info["status"] = "running"
    info["invocations"][0].pop("status")  # as evalkv 0.1 wrote a finished one: an end time, no status
    info["invocations"] += [
        {"started": "t1", "new_samples": 0, "host": socket.gethostname(), "pid": int(gone.stdout)},  # SIGKILLed
        {"started": "t2", "new_samples": 0, "host": "another-host", "pid": 1},  # cannot tell from here
        {"started": "t3", "new_samples": 0},  # evalkv 0.1: no process recorded
    ]
    (_run_dir(tmp_path) / "run.json").write_text(json.dumps(info))
    assert _pred(tmp_path, "task.n_samples=2") == 0
    statuses = [i["status"] for i in _info(tmp_path)["invocations"]]
    assert statuses == ["finished", "killed", "unknown", "unknown", "finished"]


def test_a_task_that_cannot_make_its_first_batch_fails_before_anything_is_written(tmp_path, capsys, isolated_cache):
    """RULER's vt cannot fit 1024 tokens with a byte-level tokenizer; niah_single_1 can. vt's samples are built with
    niah's, for the first batch, before config.yaml, run.json or predictions.jsonl exist."""
    assert main(["pred", *TINY[:6], "task=ruler", "task.tasks=[niah_single_1,vt]", "task.lengths=[1024]",
                 "task.num_samples=2", f"output_dir={tmp_path / 'results'}"]) == 2
    assert "ruler vt (in-context example): even the smallest haystack gives" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_finished_run_says_what_it_did_and_a_rerun_says_it_reuses_it(tmp_path, capsys):
    assert _pred(tmp_path, "task.n_samples=2") == 0
    run = _run_dir(tmp_path)
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(run)
    summary = captured.err.strip().splitlines()[-1]
    assert re.fullmatch(rf"evalkv pred: finished 2 samples \(2 new\) in \d+\.\d s; passkey \d+\.\d\d; files in "
                        rf"{re.escape(str(run))}", summary), summary
    assert _pred(tmp_path, "task.n_samples=2") == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"evalkv pred: already complete: reusing 2 records ({run})")


def test_version(capsys):
    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        assert capsys.readouterr().out == f"evalkv {version('evalkv')}\n"


@pytest.mark.heavy
def test_ctrl_c_in_a_real_process_is_one_line_not_a_traceback(tmp_path):
    """SIGINT, as Ctrl-C sends it, to a real `evalkv pred` process after its first record (tests/signal_after.py)."""
    done = run_signalled(1, "SIGINT", ["pred", *TINY, "task.depths=[0,10,20,30,40,50,60,70,80,90,100]",
                                       f"output_dir={tmp_path / 'results'}"])
    info = _info(tmp_path)
    assert len(read_records(_run_dir(tmp_path) / "predictions.jsonl")) == 1
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("evalkv pred: interrupted after 1 of 11 samples; run the same "
                                                    f"command again to resume ({_run_dir(tmp_path)})")
    assert info["status"] == "interrupted" and info["samples"] == 1 and done.stdout == ""


def test_a_run_made_before_new_options_existed_resumes(tmp_path, capsys):
    """A run folder of an earlier evalkv (its config.yaml lacks options added since, at their defaults) is the same
    run: the same command finds it complete instead of refusing it as a different config."""
    import shutil

    legacy = Path(__file__).parent / "data" / "legacy" / "runs" / "passkey-lengths=256"
    shutil.copytree(legacy, tmp_path / "passkey-lengths=256")
    assert main(["pred", "model=random-tiny-llama", "progress=false", f"output_dir={tmp_path}", "method=snapkv",
                 "budget=64", "method.window_size=8", "task.lengths=[256]", "task.n_samples=2"]) == 0
    assert "already complete: reusing 2 records" in capsys.readouterr().err
