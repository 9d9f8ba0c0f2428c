"""`evalkv pred`: run one model x method x task and append one record per sample, resumably."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import platform
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import evalkv
from evalkv.config import CacheConfig, build_run
from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine, Generation, Request
from evalkv.kv.scoring import TokenScores
from evalkv.methods import build_method
from evalkv.methods.base import Method
from evalkv.metrics import score_records
from evalkv.models.config import ModelConfig
from evalkv.models.loader import LoadedModel, load_model
from evalkv.records import (
    CONFIG,
    NO_BUDGET,
    PREDICTIONS,
    RUN_INFO,
    RecordWriter,
    compress_of,
    read_json,
    read_records,
    write_json_atomic,
    write_text_atomic,
)
from evalkv.run.invocations import (
    RunInterrupted,
    Terminated,
    new_invocation,
    now,
    settled,
    signal_of,
    sigterm_raises,
)
from evalkv.run.parallel import ShardedRun, recorded_ids
from evalkv.tasks import Sample, Task

# Keys that may change between a run and its resumption; everything else must match the stored config.
_RESUMABLE_KEYS = {"task.n_samples", "progress", "output_dir", "run_dir", "model.device", "model.device_map",
                   "batch_size", "mlp_chunk", "decode_graphs"}

_loaded: dict[str, LoadedModel] = {}


def cached_model(cfg: ModelConfig) -> LoadedModel:
    """Load a model once per process (a Hydra --multirun sweep reuses it across jobs)."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_model(cfg)
    return _loaded[key]


def _non_default(obj) -> dict:
    skip = {"budget", "compression_ratio", "n_samples", *getattr(obj, "free_options", ())}
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name not in skip and getattr(obj, f.name) != _default(f)
    }


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _compact(value) -> str:
    if isinstance(value, str) and "/" in value:  # a file option (policy_path=...): its name, not its folders
        return Path(value).name
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) else (
        f"{value:g}" if isinstance(value, float) else str(value))


def method_label(method: Method) -> str:
    """`snapkv_128`, or `snapkv_128-window_size=8` when options differ from the defaults."""
    extras = [f"{k}={_compact(v)}" for k, v in _non_default(method).items()]
    return "-".join([method.describe(), *extras])


def cache_label(cfg: DictConfig) -> str:
    """`kivi2`, or `kivi2-residual=32` when options differ from the defaults; empty for the model's dtype."""
    cache = CacheConfig(**OmegaConf.to_container(cfg.cache, resolve=True))
    if cache.quant == "none":
        return ""
    return "-".join([cache.quant, *(f"{k}={_compact(v)}" for k, v in _non_default(cache).items() if k != "quant")])


def run_method_label(cfg: DictConfig, method: Method) -> str:
    """The method's label, then `+` and the cache's when it is quantised: `snapkv_128+kivi2`."""
    cache = cache_label(cfg)
    return f"{method_label(method)}+{cache}" if cache else method_label(method)


def task_label(task: Task) -> str:
    # File locations stay out of the name (config.yaml records them; a resumed run must match them).
    extras = [f"{k}={_compact(v)}" for k, v in _non_default(task).items() if not k.endswith(("_path", "_dir"))]
    return "-".join([task.name, *extras])


def run_directory(cfg: DictConfig, method: Method, task: Task) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.output_dir) / task_label(task) / cfg.model.name / run_method_label(cfg, method)


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _with_compress(config: dict) -> dict:
    """A stored config as today's: one written before `compress` existed gets the value it ran with."""
    if "compress" in config:
        return config
    task = {key: value for key, value in config.get("task", {}).items() if key != "query_agnostic"}
    return {**config, "compress": compress_of(config), "task": {**task, "compress": compress_of(config)}}


def check_resumable(run_dir: Path, composed: dict, task: Task, method: Method) -> None:
    stored_path = run_dir / CONFIG
    if not stored_path.exists():
        return
    stored = _flatten(_with_compress(OmegaConf.to_container(OmegaConf.load(stored_path), resolve=True)))
    current = _flatten(composed)
    resumable = _RESUMABLE_KEYS | {f"task.{option}" for option in task.free_options}
    if not method.requires_budget():  # e.g. full: a sweep's budget= does not apply to it
        resumable |= {"budget", "method.budget", "compression_ratio", "method.compression_ratio"}
    if current.get("cache.quant", "none") == "none":  # KIVI's options apply to a quantised cache only
        resumable |= {"cache.group_size", "cache.residual"}
    # An option added to evalkv after the run was made is absent from its stored config: at its default, it is the
    # behaviour the run had, so the run resumes.
    defaults = {f"{section}.{item.name}": _default(item)
                for section, obj in (("method", method), ("task", task), ("model", ModelConfig), ("cache", CacheConfig))
                for item in dataclasses.fields(obj)}
    differing = sorted(
        key for key in set(stored) | set(current)
        if key not in resumable and stored.get(key) != current.get(key)
        and not (key not in stored and key in defaults and current.get(key) == defaults[key])
    )
    if differing:
        shown = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in differing[:6])
        raise EvalkvError(
            f"{run_dir} holds a run with a different config ({shown}); choose another output_dir= or run_dir=, "
            "or delete that folder to start over"
        )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_record(sample: Sample, model: LoadedModel, method: Method, generation: Generation,
                answer: tuple[Sample, Generation] | None = None) -> dict:
    """One sample's record; `answer` is its follow-up sample and that one's generation when it had one (the
    prediction is then the follow-up's output; the cost fields stay the first prompt's, the follow-up's go under
    `answer_step`)."""
    record = {
        "id": sample.id,
        "task": sample.task,
        "pred": model.decode(generation.token_ids),
        "answers": sample.answers,
        "all_classes": sample.all_classes,
        "length": sample.length,
        "prompt_tokens": generation.prompt_tokens,
        "new_tokens": len(generation.token_ids),
        "finished": generation.token_ids[-1] in _stop_token_ids(sample, model),  # a stop token, not the token limit
        "kept_tokens": round(generation.kept_tokens, 3),
        "final_kept_tokens": round(generation.final_kept_tokens, 3),
        "kv_bytes": generation.kv_bytes,
        "prefill_s": round(generation.prefill_s, 4),
        "decode_s": round(generation.decode_s, 4),
        "decode_batch": generation.decode_batch,
        "decode_graph": generation.decode_graph,
        "decode_compiled": generation.decode_compiled,
        "compress": "prompt" if sample.suffix_ids is None else "context",
        "context_reused": generation.context_reused,
        "method": method.name,
        **sample.metadata,
    }
    if answer is not None:
        follow_up, step = answer
        record.update(follow_up.metadata, pred=model.decode(step.token_ids), answer_step={
            "method": FOLLOW_UP_METHOD, "prompt_tokens": step.prompt_tokens, "new_tokens": len(step.token_ids),
            "prefill_s": round(step.prefill_s, 4), "decode_s": round(step.decode_s, 4)})
    return record


def _stop_token_ids(sample: Sample, model: LoadedModel) -> list[int]:
    return [*model.stop_token_ids, *sample.stop_token_ids]


def text_record(sample: Sample, method: Method, scores: TokenScores) -> dict:
    """The record of a scored text (perplexity): every scored token's NLL (5 decimals) in position order, from
    position `first_scored`; `evalkv score` aggregates them (evalkv/metrics/perplexity.py)."""
    nll = [round(value, 5) for value in scores.nll()]
    return {
        "id": sample.id,
        "task": sample.task,
        "pred": "",
        "answers": sample.answers,
        "all_classes": None,
        "length": sample.length,
        "prompt_tokens": len(sample.prompt_ids),
        "new_tokens": 0,
        "kept_tokens": round(scores.kept_tokens, 3),
        "kv_bytes": scores.kv_bytes,
        "prefill_s": round(scores.prefill_s, 4),
        "decode_s": round(scores.decode_s, 4),
        "method": method.name,
        "chunk_size": sample.scoring.chunk(method),
        "scored_tokens": len(nll),
        "first_scored": scores.start,
        "ppl": round(math.exp(sum(nll) / len(nll)), 4),
        **sample.metadata,
        "nll": nll,
    }


def _predict(engine: Engine, batch: list[Sample], model: LoadedModel, method: Method, batch_size: int, progress,
             follow_ups: FollowUps) -> list[tuple[dict, float, float]]:
    """(record, prefill seconds, decode seconds) of each sample of `batch`, in order: texts to score (perplexity) one
    by one through evalkv/kv/scoring.py, the other samples generated together, then their follow-ups."""
    generating = [sample for sample in batch if sample.scoring is None]
    generations = engine.generate_batch([_request(sample, model) for sample in generating], batch_size,
                                        on_finished=lambda _: progress.update(1)) if generating else []
    generated = iter(zip(generations, follow_ups.generate(generating, generations) if generating else []))
    results = []
    for sample in batch:
        if sample.scoring is None:
            generation, answer = next(generated)
            steps = [generation] if answer is None else [generation, answer[1]]
            results.append((make_record(sample, model, method, generation, answer),
                            sum(step.prefill_s for step in steps), sum(step.decode_s for step in steps)))
            continue
        scores = sample.scoring.score(engine, sample.prompt_ids)
        results.append((text_record(sample, method, scores), scores.prefill_s, scores.decode_s))
        progress.update(1)
    return results


def _request(sample: Sample, model: LoadedModel) -> Request:
    return Request(
        sample.prompt_ids, sample.max_new_tokens, stop_token_ids=_stop_token_ids(sample, model),
        suffix_ids=sample.suffix_ids, min_new_tokens=sample.min_new_tokens, sampling=sample.sampling,
    )


FOLLOW_UP_METHOD = "full"  # follow-up prompts hold no context to compress


class FollowUps:
    """The second prompts that samples make from their first output (`Sample.follow_up`), generated with the full
    cache by an engine of their own: they hold no context for the method to compress (LongBench v2's chain of
    thought answers from the question and the reasoning alone), and are not quantised by `cache.quant`."""

    def __init__(self, model: LoadedModel, cfg: DictConfig):
        self.model, self.cfg = model, cfg
        self._engine: Engine | None = None

    def generate(self, batch: list[Sample], generations: list[Generation]) -> list[tuple[Sample, Generation] | None]:
        """For each sample of the batch: (its follow-up sample, that one's generation), or None without one."""
        wanted = {}
        for index, (sample, generation) in enumerate(zip(batch, generations)):
            if sample.follow_up is not None:
                follow_up = sample.follow_up(self.model.decode(generation.token_ids))
                if follow_up is not None:
                    wanted[index] = follow_up
        answers: list[tuple[Sample, Generation] | None] = [None] * len(batch)
        if not wanted:
            return answers
        if self._engine is None:
            model, cfg = self.model, self.cfg
            self._engine = Engine(model.model, build_method(FOLLOW_UP_METHOD, {}), model.backend, model.tokenizer,
                                  mlp_chunk=cfg.mlp_chunk, decode_graphs=cfg.decode_graphs)
        steps = self._engine.generate_batch([_request(s, self.model) for s in wanted.values()], self.cfg.batch_size)
        for (index, follow_up), step in zip(wanted.items(), steps):
            answers[index] = (follow_up, step)
        return answers


def _batches(samples, done: set[str], size: int, progress) -> Iterator[list[Sample]]:
    """Samples not yet done, `size` at a time (finished ones only advance the progress bar). A batch never splits a
    run of samples about one context (compress=context): they go to one `generate_batch`, which compresses the
    context once, so a batch may hold more than `size` (it still decodes at most `size` at a time)."""
    batch: list[Sample] = []
    for sample in samples:
        if sample.id in done:
            progress.update(1)
            continue
        if len(batch) >= size and not batch[-1].shares_context(sample):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def _protocol_checked(samples, task: Task) -> Iterator[Sample]:
    """The task's samples, refused where they do not follow `compress=context` (a task that ignores it)."""
    for sample in samples:
        if task.splits_question and sample.suffix_ids is None:
            raise EvalkvError(f"task {task.name} does not support compress=context: its sample {sample.id} comes "
                              "without its question apart (Sample.suffix_ids); use compress=prompt")
        yield sample


def _expected_samples(task: Task) -> int | None:
    total = task.size()
    if total is not None and task.n_samples is not None:
        total = min(total, task.n_samples)
    return total


def _already_complete(run_dir: Path, task: Task, done: set[str]) -> bool:
    """A finished run holding at least the samples asked for: note the invocation, skip loading the model.

    A finished run did its samples from the start of the task's order, so holding as many means holding these.
    """
    info_path = run_dir / RUN_INFO
    total = _expected_samples(task)
    if total is None or len(done) < total or not info_path.exists():
        return False
    info = read_json(info_path)
    if info.get("status") != "finished":
        return False
    invocation = new_invocation()
    invocation.update(status="finished", finished=invocation["started"], wall_s=0.0,
                      note="already complete; the model was not loaded")
    info["invocations"] = [*settled(info.get("invocations", [])), invocation]
    write_json_atomic(info_path, info)
    return True


def run_labels(cfg: DictConfig, method: Method, task: Task) -> dict:
    """What tables and reports show of a run, written into run.json so that they read it instead of rebuilding the
    method and task: model, method and the options that differ from its defaults, budget label (`128`, `r0.5`, `-`
    for a method without one), the cache's quantisation (`none`, `kivi2`, ...), query-aware or agnostic, the benchmark
    tasks it was asked for, its context lengths."""
    lengths = getattr(task, "lengths", None)
    return {
        "model": str(cfg.model.name),
        "method": method.name,
        "method_variant": method_label(method).removeprefix(method.describe()).removeprefix("-"),
        "budget": _budget_label(method),
        "cache": cache_label(cfg) or "none",
        "query": "agnostic" if task.splits_question else "aware",
        "expected_tasks": [str(name) for name in getattr(task, "task_names", None) or getattr(task, "tasks", None)
                           or [task.name]],
        "context_lengths": [int(length) for length in lengths] if lengths else None,
    }


def _budget_label(method: Method) -> str:
    label = method.budget_label()
    return NO_BUDGET if label is None else label


def run_pred(cfg: DictConfig) -> Path:
    """Run (or resume) one prediction run; returns its directory. Under torchrun, this process's share of it
    (evalkv/run/parallel.py). SIGINT and SIGTERM end it with `RunInterrupted` after run.json records how far it got;
    an exception is recorded as `failed` with its message, then raised."""
    with sigterm_raises():
        try:
            return _run_pred(cfg)
        except (KeyboardInterrupt, Terminated) as stop:
            if isinstance(stop, RunInterrupted):
                raise
            raise RunInterrupted("interrupted before any sample ran; nothing was written",
                                 signal_of(stop)) from None


def _run_pred(cfg: DictConfig) -> Path:
    run = build_run(cfg)  # every check that needs no model
    composed = OmegaConf.to_container(cfg, resolve=True)
    method, task = run.method, run.task
    sharded = ShardedRun.from_environment()
    model_cfg = sharded.place(run.model)
    run_dir = run_directory(cfg, method, task)
    check_resumable(run_dir, composed, task, method)

    done = sharded.resume(run_dir)
    if not sharded.parallel and _already_complete(run_dir, task, done):
        print(f"evalkv pred: already complete: reusing {len(done)} records ({run_dir})", file=sys.stderr)
        return run_dir

    began = time.perf_counter()
    model = cached_model(model_cfg)
    engine = Engine(model.model, method, model.backend, model.tokenizer, mlp_chunk=cfg.mlp_chunk,
                    decode_graphs=cfg.decode_graphs, quantization=run.quantization)
    follow_ups = FollowUps(model, cfg)
    samples = _protocol_checked(task.samples(model), task)
    if task.n_samples is not None:
        samples = itertools.islice(samples, task.n_samples)
    total = _expected_samples(task)
    progress = tqdm(
        total=None if sharded.parallel else total,  # a rank's share is known only as the samples stream by
        desc=f"{run_method_label(cfg, method)} {task.name}", unit="sample", disable=not cfg.progress, file=sys.stderr,
        dynamic_ncols=True,
    )
    with progress:
        batches = _batches(sharded.assign(samples, done), done, cfg.batch_size, progress)
        # The first batch is built before anything is written: a task that cannot make its samples fails here.
        first = next(batches, None)
        if not sharded.order:
            raise EvalkvError(f"task {task.name} produced no samples")

        if sharded.is_main and not (run_dir / CONFIG).exists():
            write_text_atomic(run_dir / CONFIG, OmegaConf.to_yaml(composed))
        info_path = run_dir / RUN_INFO
        history = read_json(info_path).get("invocations", []) if info_path.exists() else []
        invocation = new_invocation()
        if sharded.parallel:
            invocation["processes"] = sharded.world_size
        info = {
            "evalkv": evalkv.__version__, "torch": torch.__version__, "transformers": _transformers_version(),
            "python": platform.python_version(), "device": _device_name(model.device), "model": model.description,
            "method": run_method_label(cfg, method), "task": task_label(task), "labels": run_labels(cfg, method, task),
            "status": "running", "invocations": [*settled(history), invocation],
        }
        if sharded.is_main:
            write_json_atomic(info_path, info)
        held_before = len(done)

        def ended(status: str, written: int | None = None, **details) -> int:
            """Record in run.json how this invocation ended (rank 0); returns how many samples the run holds."""
            if not sharded.is_main:
                return 0
            held = len(recorded_ids(run_dir))
            if written is None:  # other ranks may have written too: count what the folder holds
                written = held - held_before if sharded.parallel else invocation["new_samples"]
            invocation.update(status=status, finished=now(), wall_s=round(time.perf_counter() - began, 2),
                              new_samples=written, **details)
            info.pop("error", None)
            info.update(status=status, samples=held, **{k: v for k, v in details.items() if k == "error"})
            write_json_atomic(info_path, info)
            return held

        totals = {"prefill_s": 0.0, "decode_s": 0.0}
        try:
            with RecordWriter(sharded.output(run_dir)) as writer:
                # Records are written in sample order once a batch is done; a killed run loses at most one batch.
                for batch in itertools.chain([first] if first else [], batches):
                    # the bar advances as each sample's generation ends; its record is written with its batch
                    for sample, (record, prefill_s, decode_s) in zip(batch, _predict(
                            engine, batch, model, method, cfg.batch_size, progress, follow_ups)):
                        writer.write(record)
                        done.add(sample.id)
                        invocation["new_samples"] += 1
                        totals["prefill_s"] += prefill_s
                        totals["decode_s"] += decode_s
            totals = sharded.finish(run_dir, {**totals, "new_samples": invocation["new_samples"]})
        except (KeyboardInterrupt, Terminated) as stop:
            number = signal_of(stop)
            held = ended("interrupted", signal=signal.Signals(number).name)
            counted = f" after {held}{f' of {total}' if total is not None else ''} samples" if sharded.is_main else ""
            raise RunInterrupted(f"interrupted{counted}; run the same command again to resume ({run_dir})",
                                 number) from None
        except Exception as error:
            ended("failed", error=str(error) or type(error).__name__)
            raise
        invocation.update(prefill_s=round(totals["prefill_s"], 3), decode_s=round(totals["decode_s"], 3))
        held = ended("finished", written=totals["new_samples"])
    if sharded.is_main:
        print(_summary(run_dir, held, invocation), file=sys.stderr)
    return run_dir


def _summary(run_dir: Path, held: int, invocation: dict) -> str:
    """One line for the person who ran it: samples, the score where the task has a metric, wall time, the files."""
    line = f"evalkv pred: finished {held} samples ({invocation['new_samples']} new) in {invocation['wall_s']:.1f} s"
    try:
        scores = score_records(read_records(run_dir / PREDICTIONS))
    except EvalkvError:  # a task without a metric (or records another tool must score)
        scores = {}
    task_scores = scores.get("task_scores", {})
    if task_scores:
        shown = [f"{task} {value:.2f}" for task, value in list(task_scores.items())[:4]]
        if len(task_scores) > 4:
            shown.append(f"... ({len(task_scores)} tasks)")
        if len(task_scores) > 1 and scores.get("average") is not None:
            shown.append(f"average {scores['average']:.2f}")
        line += "; " + ", ".join(shown)
    return f"{line}; files in {run_dir}"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
