"""Data-parallel `evalkv pred` (torchrun, gloo on CPU processes): the records of a two-process run equal those of a
one-process run, a killed parallel run resumes to the identical records, and bad launches fail with clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.models.config import ModelConfig
from evalkv.records import read_records, record_line
from evalkv.run.parallel import ShardedRun, gpu_for, merge_shards, shard_path
from evalkv.tasks import Sample

RUN = ["model=random-tiny-llama", "model.device=cpu", "progress=false", "method=h2o", "budget=48",
       "task.lengths=[256,512]", "task.depths=[0,50,100]"]
TIMING = {"prefill_s", "decode_s", "decode_batch"}  # how a sample ran, not what it produced
LAUNCH_ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in records]


def _torchrun(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "evalkv.cli", "pred", *RUN, *overrides]
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENVIRONMENT}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _run_dir(root: Path) -> Path:
    [predictions] = root.rglob("predictions.jsonl")
    return predictions.parent


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, Path]:
    """The one-process run (one thread, as each torchrun process has): its output_dir and its run folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("reference")
        assert main(["pred", *RUN, f"output_dir={root}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, _run_dir(root)


@pytest.fixture(scope="module")
def reference(reference_run) -> list[dict]:
    """The one-process run's records."""
    records = read_records(reference_run[1] / "predictions.jsonl")
    assert len(records) == 6
    return records


def _write_lines(path: Path, records: list[dict], torn: dict | None = None) -> None:
    text = "".join(record_line(record) for record in records)
    path.write_text(text + (record_line(torn)[:20] if torn else ""), encoding="utf-8")


@pytest.mark.heavy
def test_two_processes_resume_a_killed_parallel_run_to_the_records_of_one_process(tmp_path, reference_run, reference):
    """What a kill leaves under output_dir's run folder: merged records, shards out of order, a shard's last line
    cut short. The two processes (one torchrun, the slowest test of the module) merge them first, then share the
    three samples left: the records equal the one-process run's, printed once, the shards merged away."""
    root, reference_folder = reference_run
    run = tmp_path / reference_folder.relative_to(root)  # where output_dir= puts the run
    run.mkdir(parents=True)
    r0, r1, r2, r3, r4, r5 = reference
    _write_lines(run / "predictions.jsonl", [r0])
    _write_lines(shard_path(run, 0), [r4, r2])
    _write_lines(shard_path(run, 1), [r0], torn=r5)
    result = _torchrun(f"output_dir={tmp_path}")
    assert result.stdout.strip().splitlines() == [str(run)]  # printed once, by rank 0
    assert {p.name for p in run.iterdir()} == {"config.yaml", "predictions.jsonl", "run.json"}
    assert _without_timing(read_records(run / "predictions.jsonl")) == _without_timing(reference)
    [invocation] = json.loads((run / "run.json").read_text())["invocations"]
    assert invocation["processes"] == 2 and invocation["new_samples"] == 3


def test_one_process_resumes_a_killed_parallel_run(tmp_path, reference, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write_lines(run / "predictions.jsonl", reference[:1])
    _write_lines(shard_path(run, 1), [reference[3], reference[1]], torn=reference[4])
    assert main(["pred", *RUN, f"run_dir={run}"]) == 0
    assert "merged 1 shard(s)" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "predictions.jsonl", "run.json"]
    assert _without_timing(read_records(run / "predictions.jsonl")) == _without_timing(reference)
    assert json.loads((run / "run.json").read_text())["invocations"][0]["new_samples"] == 3


def test_merge_keeps_first_occurrence_and_task_order(tmp_path):
    _write_lines(tmp_path / "predictions.jsonl", [{"id": "b", "pred": "kept"}])
    _write_lines(shard_path(tmp_path, 10), [{"id": "c"}])
    _write_lines(shard_path(tmp_path, 2), [{"id": "b", "pred": "duplicate"}, {"id": "old"}, {"id": "a"}])
    assert merge_shards(tmp_path, order=["a", "b", "c"]) == 2
    assert read_records(tmp_path / "predictions.jsonl") == [
        {"id": "a"}, {"id": "b", "pred": "kept"}, {"id": "c"}, {"id": "old"}]
    assert not list(tmp_path.glob("predictions.rank*"))
    assert merge_shards(tmp_path) == 0


def test_each_pending_sample_goes_to_exactly_one_rank():
    samples = [Sample(str(i), "passkey", [i], ["1"], 1) for i in range(7)]
    done = {"1", "4"}
    shares = [[s.id for s in ShardedRun(rank=r, world_size=3).assign(samples, done)] for r in range(3)]
    assert shares == [["0", "5"], ["2", "6"], ["3"]]
    assert [s.id for s in ShardedRun().assign(samples, done)] == [str(i) for i in range(7)]  # its loop skips


def test_device_map_with_data_parallel_is_refused():
    with pytest.raises(EvalkvError, match="device_map=auto spreads one model .* use one or the other"):
        ShardedRun(rank=1, world_size=2).place(ModelConfig(device_map="auto"))
    with pytest.raises(EvalkvError, match="model.device=cuda:1 with 2 data-parallel processes"):
        ShardedRun(rank=1, world_size=2).place(ModelConfig(device="cuda:1"))
    assert ShardedRun().place(ModelConfig(device_map="auto")).device_map == "auto"


def test_processes_per_gpu_share_gpus_in_blocks_and_refuse_too_many_ranks():
    assert [gpu_for(rank, 1, 4) for rank in range(4)] == [0, 1, 2, 3]
    assert [gpu_for(rank, 3, 2) for rank in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(EvalkvError, match="LOCAL_RANK=6 with 3 process.*needs GPU 2, but only 2 are visible: start "
                                          "at most 6 processes"):
        gpu_for(6, 3, 2)
    with pytest.raises(EvalkvError, match="LOCAL_RANK=1 with 1 process.*at most 1 processes .*PROCESSES_PER_GPU"):
        gpu_for(1, 1, 1)
    with pytest.raises(EvalkvError, match="EVALKV_PROCESSES_PER_GPU=0"):
        gpu_for(0, 0, 1)


def test_each_rank_takes_its_own_gpu_or_the_cpu():
    placed = ShardedRun(rank=1, world_size=2, local_rank=1).place(ModelConfig(device="auto"))
    assert placed.device == ("cuda:1" if torch.cuda.device_count() > 1 else "auto")
    assert ShardedRun(rank=1, world_size=2, local_rank=1).place(ModelConfig(device="cpu")).device == "cpu"


@pytest.mark.parametrize(("environment", "message"), [
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 with WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not a non-negative integer"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "set without MASTER_ADDR and MASTER_PORT: launch the processes with torchrun"),
])
def test_bad_launch_environment_is_a_clear_error(tmp_path, monkeypatch, capsys, environment, message):
    for name in LAUNCH_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    try:
        code = main(["pred", *RUN, f"output_dir={tmp_path}"])
    except SystemExit as exit:  # under a launcher an error in a run ends the process (torchrun then ends the rest)
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("predictions*.jsonl"))
