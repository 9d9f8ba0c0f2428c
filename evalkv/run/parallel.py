"""Data-parallel `evalkv pred`: one process per GPU, samples sharded, records merged, resumption exact.

    torchrun --standalone --nproc-per-node 4 -m evalkv.cli pred model=llama3 method=snapkv budget=128

starts four processes (torchrun, or `accelerate launch`, sets RANK, WORLD_SIZE, LOCAL_RANK). Each loads the whole
model on its own GPU (`cuda:LOCAL_RANK`; the CPU where there is none), takes every fourth sample of those not yet
done (questions about one context stay together), and appends its records to its own shard
`predictions.rank<r>.jsonl`. When every rank has finished, rank 0 merges the shards into `predictions.jsonl` in the
task's sample order (one atomic write) and removes them, so the run's files are those of a one-process run. A killed
run leaves its shards behind; the next run, parallel or not, merges them first, so nothing finished is redone and
nothing is duplicated.

The processes coordinate through a gloo process group: barriers and one small gather of totals, no tensor crosses
devices, so the same code runs on a GPU host and in CPU-only tests.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from evalkv.errors import EvalkvError
from evalkv.models.config import ModelConfig
from evalkv.records import PREDICTIONS, drop_torn_tail, read_records, write_records_atomic
from evalkv.tasks import Sample

SHARD_GLOB = "predictions.rank*.jsonl"
# Ranks finish at different times (samples differ in length); a failed rank ends the group through torchrun.
_BARRIER_TIMEOUT = timedelta(days=1)
# Processes that share one GPU (default 1): LOCAL_RANK r runs on GPU r // this. For small models, whose decode is
# launch-bound, several processes keep one GPU busier; under CUDA MPS their kernels also run concurrently.
PROCESSES_PER_GPU = "EVALKV_PROCESSES_PER_GPU"
_LAUNCH = "torchrun --standalone --nproc-per-node N -m evalkv.cli pred ..."


def shard_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"predictions.rank{rank}.jsonl"


def _shards(run_dir: Path) -> list[Path]:
    def rank(path: Path) -> int:
        suffix = path.name.removeprefix("predictions.rank").removesuffix(".jsonl")
        return int(suffix) if suffix.isdigit() else sys.maxsize

    return sorted(run_dir.glob(SHARD_GLOB), key=rank)


def recorded_ids(run_dir: Path) -> set[str]:
    """The ids of every record the run holds: in `predictions.jsonl` and in any shard not merged yet."""
    files = [run_dir / PREDICTIONS, *_shards(run_dir)]
    return {str(record.get("id")) for path in files if path.exists() for record in read_records(path)}


def merge_shards(run_dir: Path, order: list[str] | None = None) -> int:
    """Fold every shard into `predictions.jsonl` and remove the shards; returns how many shards there were.

    Records keep their first occurrence by id (`predictions.jsonl` first, then the shards by rank), so a merge
    interrupted after its write and before the removals is harmless. With `order` (the task's sample ids) the
    records are sorted by it; ids it does not know (a smaller `task.n_samples` than an earlier run) go last, in
    their previous order. A shard's last line cut short by a kill is dropped, as on resumption.
    """
    predictions, shards = run_dir / PREDICTIONS, _shards(run_dir)
    if not shards and order is None:
        return 0
    records, seen = [], set()
    for path in [predictions, *shards]:
        for record in read_records(path) if path.exists() else []:
            if str(record.get("id")) not in seen:
                seen.add(str(record.get("id")))
                records.append(record)
    if order is not None:
        position = {sample_id: index for index, sample_id in enumerate(order)}
        records.sort(key=lambda record: position.get(str(record.get("id")), len(position)))
    write_records_atomic(predictions, records)
    for shard in shards:
        shard.unlink()
    return len(shards)


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit():
        raise EvalkvError(f"{name}={value!r} in the environment is not a non-negative integer; launch with {_LAUNCH}")
    return int(value)


def gpu_for(local_rank: int, per_gpu: int, gpus: int) -> int:
    """The GPU of the process with this LOCAL_RANK when `per_gpu` processes share each GPU: ranks 0..per_gpu-1 take
    GPU 0, the next `per_gpu` GPU 1, and so on."""
    if per_gpu < 1:
        raise EvalkvError(f"{PROCESSES_PER_GPU}={per_gpu}: at least one process runs on each GPU")
    index = local_rank // per_gpu
    if index >= gpus:
        raise EvalkvError(
            f"LOCAL_RANK={local_rank} with {per_gpu} process(es) per GPU needs GPU {index}, but only {gpus} are "
            f"visible: start at most {gpus * per_gpu} processes per node (--nproc-per-node), or set "
            f"{PROCESSES_PER_GPU} to share each GPU between more processes"
        )
    return index


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) for a plain `evalkv pred`."""
    return _environment_int("RANK", 0), _environment_int("WORLD_SIZE", 1)


@dataclass
class ShardedRun:
    """This process's share of a `evalkv pred` run: rank `rank` of `world_size` (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    order: list[str] = field(default_factory=list)  # every sample id of the task, in its order
    recovered: bool = False  # a killed run's shards were merged at the start

    @classmethod
    def from_environment(cls) -> ShardedRun:
        """The rank torchrun (or accelerate launch) gave this process."""
        rank, world_size = launched_ranks()
        if world_size < 1 or rank >= world_size:
            raise EvalkvError(f"RANK={rank} with WORLD_SIZE={world_size}: a rank must lie in 0..WORLD_SIZE-1")
        return cls(rank=rank, world_size=world_size, local_rank=_environment_int("LOCAL_RANK", 0))

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes config.yaml, run.json and the merged predictions.jsonl, and prints the run directory."""
        return self.rank == 0

    def _join_group(self) -> None:
        import torch.distributed as dist

        if not self.parallel or dist.is_initialized():  # a --multirun sweep runs several jobs in one process
            return
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise EvalkvError(
                f"WORLD_SIZE={self.world_size} is set without {' and '.join(missing)}: launch the processes with "
                f"{_LAUNCH}"
            )
        dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size, timeout=_BARRIER_TIMEOUT)
        atexit.register(dist.destroy_process_group)

    def _barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    def place(self, model: ModelConfig) -> ModelConfig:
        """The model config for this rank: the whole model on `cuda:LOCAL_RANK` (with EVALKV_PROCESSES_PER_GPU=k,
        `cuda:LOCAL_RANK // k`; the CPU without GPUs)."""
        if not self.parallel:
            return model
        if model.device_map is not None:
            raise EvalkvError(
                f"model.device_map={model.device_map} spreads one model over the GPUs, while {self.world_size} "
                "data-parallel processes each hold a whole model; use one or the other (device_map for a model "
                "larger than one GPU, torchrun for more throughput with a model that fits)"
            )
        if model.device not in ("auto", "cuda", "cpu"):
            raise EvalkvError(
                f"model.device={model.device} with {self.world_size} data-parallel processes: each process takes "
                "cuda:LOCAL_RANK, so set model.device=auto (or cuda, or cpu) and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        if model.device == "cpu" or not torch.cuda.is_available():  # auto means the CPU; cuda fails in the loader
            return model
        index = gpu_for(self.local_rank, _environment_int(PROCESSES_PER_GPU, 1), torch.cuda.device_count())
        torch.cuda.set_device(index)
        return dataclasses.replace(model, device=f"cuda:{index}")

    def resume(self, run_dir: Path) -> set[str]:
        """The ids already finished. Joins the process group; rank 0 first repairs what a kill may have left (a torn
        last line, a killed parallel run's shards) while the other ranks wait, so every rank sees the same set."""
        self._join_group()
        predictions = run_dir / PREDICTIONS
        if self.is_main:
            if drop_torn_tail(predictions):
                print(f"{predictions}: removed a last line cut short by an interrupted write", file=sys.stderr)
            merged = merge_shards(run_dir)
            if merged:
                self.recovered = True
                print(f"{run_dir}: merged {merged} shard(s) left by an interrupted parallel run", file=sys.stderr)
        self._barrier()
        return {str(record.get("id")) for record in read_records(predictions)} if predictions.exists() else set()

    def assign(self, samples: Iterable[Sample], done: set[str]) -> Iterator[Sample]:
        """This rank's samples: of those not in `done`, the i-th run of samples about one context (one sample, unless
        consecutive samples share their context under compress=context) goes to rank i % world_size, so a context is
        compressed once. One process gets every sample (its loop skips the finished ones). Remembers the task's
        order of ids for the merge."""
        run, previous = -1, None
        for sample in samples:
            self.order.append(sample.id)
            if not self.parallel:
                yield sample
            elif sample.id not in done:
                if previous is None or not previous.shares_context(sample):
                    run += 1
                previous = sample
                if run % self.world_size == self.rank:
                    yield sample

    def output(self, run_dir: Path) -> Path:
        """Where this rank appends its records: `predictions.jsonl`, or its shard when there are several ranks."""
        return shard_path(run_dir, self.rank) if self.parallel else run_dir / PREDICTIONS

    def finish(self, run_dir: Path, totals: dict[str, float]) -> dict[str, float]:
        """Wait for every rank, merge the shards (rank 0) and return `totals` summed over the ranks."""
        if not self.parallel:
            if self.recovered:
                merge_shards(run_dir, self.order)
            return totals
        import torch.distributed as dist

        gathered: list[dict[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, totals)  # also the barrier: every rank has closed its shard
        if self.is_main:
            merge_shards(run_dir, self.order)
        return {key: sum(part[key] for part in gathered) for key in totals}
