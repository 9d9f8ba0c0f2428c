"""`evalkv bench`: prefill time, eviction overhead, decode speed, time to first token, peak memory and KV bytes held,
per method x context length x batch size, with warm-up and repeated runs.

Prompts are random token ids and generation has a fixed length (end-of-turn tokens are ignored), so a random-weight
architecture preset measures speed and memory honestly; the report says so. Eviction overhead is the method's
prefill time minus the full cache's on the same prompt, as a fraction of the full cache's prefill time. A batch of
B prompts is prefilled one by one and decoded together where the method allows (`Engine.generate_batch`); the decode
step is compared with the HBM-bandwidth bound, the model's weight bytes divided by the measured copy bandwidth. A
cell that runs out of device memory is recorded (`out_of_memory`: how far one GPU goes) and the grid goes on.

`--workload longbench` times a whole LongBench-shaped workload instead (evalkv/run/workload.py): every sample goes
through `Engine.generate_batch` in batches of `batch_size` samples, as `evalkv pred` runs them, with no stop tokens,
so each generates exactly its task's max new tokens; the wall time covers prefill, compression and decode of every
sample (model load excluded, the device synchronised before each clock read). `--workload reasoning` does the same
with short prompts and long generations. Each row puts the workload's physical floor beside its wall time
(evalkv/run/floor.py): prefill FLOPs over the measured peak matmul rate plus decode bytes (weights and KV) over the
measured copy bandwidth.

`--questions N` times several questions about one context: a random context of each length with N random questions,
answered from one compression of the context (`Engine.generate_batch` with the N requests, which shares it) and by
compressing the context again for each question (one `generate_batch` per question), with the same engine and
method; both decode one question at a time, so the ratio of the two wall times is what sharing the compression saves.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch
import transformers

import evalkv
from evalkv.kv.adapter import geometry, synchronize
from evalkv.kv.engine import Engine, Request
from evalkv.kv.quant import Kivi
from evalkv.methods import build_method
from evalkv.models.loader import LoadedModel
from evalkv.run.floor import Architecture, SampleCost, workload_floor
from evalkv.run.workload import summary as workload_summary


@dataclass
class BenchRow:
    method: str
    context_length: int
    batch_size: int  # prompts of this length per run
    decode_batch: int  # how many of them decoded together (1: the method's caches cannot batch, e.g. full)
    decode_graphs: str  # the engine's decode_graphs mode
    decode_graph: bool  # whether the decode steps replayed a CUDA graph
    decode_compiled: bool  # whether the decode steps ran a torch.compile'd step
    new_tokens: int
    prefill_s: float  # median over repeats and prompts; one prompt's forward(s) with eviction (= TTFT)
    prefill_s_all: list[float]
    eviction_overhead: float | None  # (prefill - full prefill) / full prefill
    decode_step_s: float  # median wall time of one decode step of the whole batch
    decode_tokens_per_s: float  # per sequence: 1 / decode_step_s when the batch decodes together
    throughput_tokens_per_s: float  # all sequences: batch_size x new tokens / decode wall time
    hbm_bound_fraction: float | None  # (weight bytes / copy bandwidth) / decode_step_s
    kv_bound_fraction: float | None  # ((weight bytes + the decode batch's mean KV bytes) / copy bandwidth) / step
    decode_s_all: list[float]
    peak_memory_gb: float | None  # torch.cuda.max_memory_allocated over the run (GPU only)
    kv_bytes_after_prefill: int  # per sequence
    kv_bytes_final: int
    kept_tokens: float
    cache: str = "none"  # cache.quant: how what the method keeps is held (kivi2, kivi4: KIVI codes)


def copy_bandwidth(device: torch.device, megabytes: int | None = None, repeats: int = 5) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write), the best of a few copies of `megabytes` (1024 on
    CUDA; 256 on the CPU, still far past its caches, where 1024 takes a second)."""
    megabytes = megabytes or (1024 if device.type == "cuda" else 256)
    elements = megabytes * 2**20 // 2
    source = torch.empty(elements, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        began = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - began)
    del source, target
    return 2 * elements * 2 / best


def peak_matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Measured matmul rate in FLOP/s: the best of a few square products in the model's dtype (8192 on CUDA, 1024 on
    the CPU, where a larger one takes seconds)."""
    size = 8192 if device.type == "cuda" else 1024
    left = torch.randn(size, size, device=device).to(dtype)
    right = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        began = time.perf_counter()
        torch.matmul(left, right)
        synchronize(device)
        best = min(best, time.perf_counter() - began)
    del left, right
    return 2 * size**3 / best


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def model_architecture(model) -> Architecture:
    """The numbers the floor needs: the decoder's nn.Linear weights, the LM head's, the attention geometry, and the
    bytes a decode step reads (an input embedding that the LM head does not share is looked up, not read whole)."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    lookup_only = 0 if embedding.data_ptr() == head.data_ptr() else embedding.numel() * embedding.element_size()
    heads = geometry(model)
    return Architecture(
        linear_parameters=sum(module.weight.numel() for module in model.get_decoder().modules()
                              if isinstance(module, torch.nn.Linear)),
        lm_head_parameters=head.numel(), layers=heads.num_layers, query_heads=heads.num_heads,
        head_dim=heads.head_dim, decode_weight_bytes=weight_bytes(model) - lookup_only,
    )


def _environment(model: LoadedModel) -> dict:
    """The head of every report: versions, device, model and date."""
    device = model.device
    return {
        "evalkv": evalkv.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model.description, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, in GB (None off the GPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def bench_method(
    model: LoadedModel, method_name: str, options: dict, lengths: list[int], new_tokens: int, repeats: int,
    warmup: int, seed: int, batch_sizes: list[int] = (1,), bandwidth: float | None = None,
    mlp_chunk: int | None = None, decode_graphs: str = "auto", quantization: Kivi | None = None,
    failures: list[BenchFailure] | None = None,
) -> list[BenchRow]:
    """bandwidth: the device's copy bandwidth in bytes/s, for the bound columns (None: left empty).
    quantization: hold what the method keeps as KIVI codes (cache.quant; None: as the model's dtype).
    failures: where a length and batch size that runs out of device memory is recorded (the next ones still run);
    None: the error propagates."""
    method = build_method(method_name, options)
    bound_step_s = None if not bandwidth else weight_bytes(model.model) / bandwidth
    engine = Engine(model.model, method, model.backend, model.tokenizer, mlp_chunk=mlp_chunk,
                    decode_graphs=decode_graphs, quantization=quantization)
    vocab = model.model.config.vocab_size
    device = model.device
    rows = []
    for length in lengths:
        for batch_size in batch_sizes:
            generator = torch.Generator().manual_seed(seed + length)
            prompts = [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(batch_size)]
            prefill, decode = [], []
            failed = None
            _reset_peak_memory(device)
            try:
                for _ in range(warmup):  # full length: a graph of these shapes is compiled and captured, then replayed
                    engine.generate_batch([Request(prompt, new_tokens) for prompt in prompts])
                _reset_peak_memory(device)
                for _ in range(repeats):
                    synchronize(device)
                    began = time.perf_counter()
                    generations = engine.generate_batch([Request(prompt, new_tokens) for prompt in prompts])
                    synchronize(device)
                    wall = time.perf_counter() - began
                    prefill.extend(g.prefill_s for g in generations)
                    decode.append(wall - sum(g.prefill_s for g in generations))
            except torch.OutOfMemoryError as error:
                if failures is None:
                    raise
                failed = BenchFailure(method_name, length, batch_size, decode_graphs,
                                      "none" if quantization is None else quantization.name, _peak_memory_gb(device),
                                      str(error).splitlines()[0] if str(error) else "out of memory")
            if failed is not None:  # outside the handler, whose traceback holds the failed run's tensors
                engine = _after_out_of_memory(engine, model, method, mlp_chunk, decode_graphs, quantization)
                failures.append(failed)
                print(json.dumps(asdict(failed)), file=sys.stderr, flush=True)
                continue
            peak = _peak_memory_gb(device)
            decode_median = statistics.median(decode)
            steps = max(1, new_tokens - 1)
            together = generations[0].decode_batch
            step_s = decode_median / steps / (batch_size // together)
            # A step reads the weights and every sequence's cache; the cache grows from its size after prefill to its
            # final size, so its mean is what a step reads on average (a decode graph's buffer, with room for every
            # step, is read whole: the bound then counts fewer bytes than are read, never more).
            mean_kv = (generations[0].kv_bytes + generations[0].final_kv_bytes) / 2
            kv_bound_s = None if bound_step_s is None else bound_step_s + together * mean_kv / bandwidth
            rows.append(BenchRow(
                method=method_name, context_length=length, batch_size=batch_size, decode_batch=together,
                decode_graphs=decode_graphs, decode_graph=generations[0].decode_graph,
                decode_compiled=generations[0].decode_compiled,
                new_tokens=new_tokens, prefill_s=round(statistics.median(prefill), 4),
                prefill_s_all=[round(x, 4) for x in prefill], eviction_overhead=None,
                decode_step_s=step_s, decode_tokens_per_s=round(1 / step_s, 2) if step_s > 0 else 0.0,
                throughput_tokens_per_s=round(batch_size * steps / decode_median, 2) if decode_median > 0 else 0.0,
                hbm_bound_fraction=None if bound_step_s is None or step_s <= 0 else round(bound_step_s / step_s, 4),
                kv_bound_fraction=None if kv_bound_s is None or step_s <= 0 else round(kv_bound_s / step_s, 4),
                decode_s_all=[round(x, 4) for x in decode], peak_memory_gb=peak,
                kv_bytes_after_prefill=generations[0].kv_bytes, kv_bytes_final=generations[0].final_kv_bytes,
                kept_tokens=round(generations[0].kept_tokens, 2),
                cache="none" if quantization is None else quantization.name,
            ))
            print(json.dumps(asdict(rows[-1])), file=sys.stderr, flush=True)
    return rows


@dataclass
class BenchFailure:
    """A grid cell that ran out of device memory: how far one GPU goes (the report lists it under the table)."""

    method: str
    context_length: int
    batch_size: int
    decode_graphs: str
    cache: str
    peak_memory_gb: float | None  # torch.cuda.max_memory_allocated up to the failure
    error: str


def _after_out_of_memory(engine: Engine, model: LoadedModel, method, mlp_chunk: int | None, decode_graphs: str,
                         quantization: Kivi | None) -> Engine:
    """Free what a failed run left (its caches, a kept decode graph) and start the method on a fresh engine."""
    import gc

    del engine
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return Engine(model.model, method, model.backend, model.tokenizer, mlp_chunk=mlp_chunk,
                  decode_graphs=decode_graphs, quantization=quantization)


def add_overheads(rows: list[BenchRow]) -> None:
    """Each row's prefill against the full cache's at the same length, batch size, decode mode and cache type."""
    full = {(row.context_length, row.batch_size, row.decode_graphs, row.cache): row.prefill_s
            for row in rows if row.method == "full"}
    for row in rows:
        base = full.get((row.context_length, row.batch_size, row.decode_graphs, row.cache))
        if base:
            row.eviction_overhead = round((row.prefill_s - base) / base, 4)


def run_bench(model: LoadedModel, methods: list[tuple[str, dict]], lengths: list[int], new_tokens: int,
              repeats: int, warmup: int, seed: int = 0, batch_sizes: list[int] = (1,),
              mlp_chunk: int | None = None, decode_graphs: Sequence[str] = ("auto",),
              quantization: Kivi | None = None) -> dict:
    device = model.device
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes(model.model)
    bound_step_s = weights / bandwidth
    rows: list[BenchRow] = []
    failures: list[BenchFailure] = []
    for mode in decode_graphs:
        for name, options in methods:
            rows.extend(bench_method(model, name, options, lengths, new_tokens, repeats, warmup, seed, batch_sizes,
                                     bandwidth, mlp_chunk, mode, quantization, failures))
    add_overheads(rows)
    return {
        **_environment(model),
        "note": "random prompt ids; fixed generation length (end-of-turn tokens ignored); medians over repeats",
        "weight_bytes": weights, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "hbm_bound_step_s": bound_step_s, "mlp_chunk": mlp_chunk, "decode_graphs": list(decode_graphs),
        "cache": None if quantization is None else asdict(quantization),
        "methods": [{"method": name, "options": options} for name, options in methods],
        "rows": [asdict(row) for row in rows],
        "out_of_memory": [asdict(failure) for failure in failures],
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def _peak(row: dict) -> str:
    return "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"


def _graph_cell(row: dict) -> str:
    """yes / no: replayed a CUDA graph; ", compiled": of a torch.compile'd step."""
    return ("yes" if row["decode_graph"] else "no") + (", compiled" if row["decode_compiled"] else "")


def format_rows(report: dict) -> str:
    header = ["method", "graph", "length", "batch", "prefill_s", "overhead", "step_ms", "tok/s/seq", "tok/s",
              "of_bound", "of_bound_kv", "peak_GB", "kv_MB", "kept"]
    cells = []
    for row in report["rows"]:
        overhead = "-" if row["eviction_overhead"] is None else f"{100 * row['eviction_overhead']:.1f}%"
        bound = "-" if row["hbm_bound_fraction"] is None else f"{100 * row['hbm_bound_fraction']:.0f}%"
        kv_bound = "-" if row.get("kv_bound_fraction") is None else f"{100 * row['kv_bound_fraction']:.0f}%"
        batch = f"{row['batch_size']}" + ("" if row["decode_batch"] == row["batch_size"] else
                                           f" (decoded {row['decode_batch']} at a time)")
        quantized = row.get("cache", "none") != "none"
        cells.append([
            row["method"] + (f"+{row['cache']}" if quantized else ""), _graph_cell(row),
            f"{row['context_length']}", batch,
            f"{row['prefill_s']:.3f}", overhead,
            f"{1000 * row['decode_step_s']:.2f}", f"{row['decode_tokens_per_s']:.1f}",
            f"{row['throughput_tokens_per_s']:.1f}", bound, kv_bound, _peak(row),
            f"{row['kv_bytes_after_prefill'] / 2**20:.1f}",
            f"{row['kept_tokens']:g}",
        ])
    table = markdown_table(header, cells)
    for failure in report.get("out_of_memory", []):
        peak = "" if failure["peak_memory_gb"] is None else f" (peak {failure['peak_memory_gb']:.2f} GB before it)"
        cache = "" if failure["cache"] == "none" else f"+{failure['cache']}"
        table += (f"\n{failure['method']}{cache} at {failure['context_length']} tokens, batch {failure['batch_size']}, "
                  f"decode_graphs {failure['decode_graphs']}: out of device memory{peak}\n")
    return table


@dataclass
class WorkloadRow:
    method: str
    options: dict
    samples: int
    batch_size: int  # samples per generate_batch call (evalkv pred's batch_size)
    mean_decode_batch: float  # mean over samples of how many decoded together
    decode_graphs: str  # the engine's decode_graphs mode
    graph_samples: int  # samples whose decode steps replayed a CUDA graph
    compiled_samples: int  # samples whose decode steps ran a torch.compile'd step
    prompt_tokens: int
    generated_tokens: int  # the sum of the samples' max new tokens (EOS ignored; checked)
    wall_s: float  # median over repeats of the whole workload: prefill, compression and decode of every sample
    wall_s_all: list[float]
    samples_per_s: float
    generated_tokens_per_s: float
    prefill_s: float  # the samples' prefill times summed (last repeat); the rest of the wall time is decoding
    kept_tokens: float  # mean entries per layer and KV head after the prompt
    peak_memory_gb: float | None  # torch.cuda.max_memory_allocated over the timed repeats (GPU only)
    floor: dict | None  # the workload's physical floor at this batch size with this method's KV (evalkv/run/floor.py)
    of_floor: float | None  # floor_s / wall_s


def bench_workload_method(model: LoadedModel, method_name: str, options: dict, samples: list[dict], batch_size: int,
                          repeats: int, warmup: int, mlp_chunk: int | None = None, decode_graphs: str = "auto",
                          rates: tuple[float, float] | None = None) -> WorkloadRow:
    """Every sample of the workload through `Engine.generate_batch`, `batch_size` at a time, as `evalkv pred` runs
    them; no stop tokens, so each sample generates exactly its max new tokens.

    rates: the device's peak matmul rate (FLOP/s) and copy bandwidth (bytes/s), for the floor (None: no floor)."""
    method = build_method(method_name, options)
    engine = Engine(model.model, method, model.backend, model.tokenizer, mlp_chunk=mlp_chunk,
                    decode_graphs=decode_graphs)
    device = model.device
    requests = [Request(torch.tensor(sample["prompt_ids"]), sample["max_new_tokens"]) for sample in samples]
    for _ in range(warmup):
        engine.generate_batch([Request(requests[0].prompt_ids, min(4, requests[0].max_new_tokens))])
    _reset_peak_memory(device)
    walls = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        generations = []
        for start in range(0, len(requests), batch_size):
            generations.extend(engine.generate_batch(requests[start : start + batch_size], batch_size))
        synchronize(device)
        walls.append(time.perf_counter() - began)
    short = [i for i, (g, r) in enumerate(zip(generations, requests)) if len(g.token_ids) != r.max_new_tokens]
    if short:
        raise RuntimeError(f"workload samples {short[:5]} did not generate their max new tokens")
    peak = _peak_memory_gb(device)
    wall = statistics.median(walls)
    generated = sum(len(g.token_ids) for g in generations)
    floor = None if rates is None else workload_floor(
        model_architecture(model.model),
        [SampleCost(g.prompt_tokens, len(g.token_ids), g.kv_bytes, g.final_kv_bytes) for g in generations],
        batch_size, *rates)
    return WorkloadRow(
        method=method_name, options=options, samples=len(samples), batch_size=batch_size,
        mean_decode_batch=round(statistics.mean(g.decode_batch for g in generations), 2),
        decode_graphs=decode_graphs, graph_samples=sum(g.decode_graph for g in generations),
        compiled_samples=sum(g.decode_compiled for g in generations),
        prompt_tokens=sum(g.prompt_tokens for g in generations), generated_tokens=generated,
        wall_s=round(wall, 3), wall_s_all=[round(x, 3) for x in walls],
        samples_per_s=round(len(samples) / wall, 3), generated_tokens_per_s=round(generated / wall, 2),
        prefill_s=round(sum(g.prefill_s for g in generations), 3),
        kept_tokens=round(statistics.mean(g.kept_tokens for g in generations), 2),
        peak_memory_gb=peak, floor=floor,
        of_floor=None if floor is None or wall <= 0 else round(floor["floor_s"] / wall, 4),
    )


def run_workload_bench(model: LoadedModel, methods: list[tuple[str, dict]], workload: dict, batch_size: int,
                       repeats: int, warmup: int, mlp_chunk: int | None = None,
                       decode_graphs: Sequence[str] = ("auto",)) -> dict:
    rates = peak_matmul_rate(model.device, model.model.dtype), copy_bandwidth(model.device)
    rows = []
    for mode in decode_graphs:
        for name, options in methods:
            rows.append(bench_workload_method(model, name, options, workload["samples"], batch_size, repeats,
                                              warmup, mlp_chunk, mode, rates))
            print(json.dumps(asdict(rows[-1])), file=sys.stderr, flush=True)
    shape = ("LongBench-shaped workload of random prompt ids; EOS ignored: every sample generates exactly its task's "
             "max new tokens (LongBench's dataset2maxlen)" if workload.get("workload") == "longbench" else
             f"{workload.get('workload')} workload of random prompt ids; EOS ignored: every sample generates exactly "
             "its max new tokens")
    return {
        **_environment(model),
        "note": f"{shape}; wall time = prefill + compression + decode of every sample, model load excluded; median "
                f"over repeats; floor = prefill FLOPs / peak matmul rate + decode bytes (weights once a step per "
                f"batch of {batch_size}, KV of every sample) / copy bandwidth",
        "workload": workload_summary(workload), "batch_size": batch_size, "repeats": repeats, "warmup": warmup,
        "mlp_chunk": mlp_chunk, "decode_graphs": list(decode_graphs),
        "peak_tflops": round(rates[0] / 1e12, 3), "copy_bandwidth_gb_s": round(rates[1] / 1e9, 1),
        "rows": [asdict(row) for row in rows],
    }


def format_workload_rows(report: dict) -> str:
    header = ["method", "budget", "graphed", "samples", "prompt_tok", "new_tok", "batch", "wall_s", "floor_s",
              "of_floor", "samples/s", "tok/s", "peak_GB"]
    cells = []
    modes = len(set(report.get("decode_graphs") or [])) > 1  # rows of one method differ only by their mode
    for row in report["rows"]:
        batch = f"{row['batch_size']}" + ("" if row["mean_decode_batch"] == row["batch_size"] else
                                          f" (decoded {row['mean_decode_batch']:g} on average)")
        cells.append([
            row["method"] + (f" ({row['decode_graphs']})" if modes else ""), f"{row['options'].get('budget', '-')}",
            f"{row['graph_samples']}" + (f" ({row['compiled_samples']} compiled)" if row["compiled_samples"] else ""),
            f"{row['samples']}", f"{row['prompt_tokens']}",
            f"{row['generated_tokens']}", batch, f"{row['wall_s']:.2f}",
            "-" if row.get("floor") is None else f"{row['floor']['floor_s']:.3g}",
            "-" if row.get("of_floor") is None else f"{100 * row['of_floor']:.1f}%",
            f"{row['samples_per_s']:.3f}", f"{row['generated_tokens_per_s']:.1f}", _peak(row),
        ])
    return markdown_table(header, cells)


@dataclass
class QuestionsRow:
    method: str
    context_length: int
    questions: int  # questions about the one context
    question_tokens: int  # tokens of each question (fed after the context was compressed)
    new_tokens: int  # generated per question (EOS ignored)
    decode_graphs: str  # the engine's decode_graphs mode
    shared_wall_s: float  # median over repeats: the context compressed once, then every question answered
    shared_wall_s_all: list[float]
    recompressed_wall_s: float  # median over repeats: every question with its own compression of the context
    recompressed_wall_s_all: list[float]
    speedup: float  # recompressed_wall_s / shared_wall_s
    shared_prefill_s: float  # the questions' prefill times summed (last repeat): one compression + N questions
    recompressed_prefill_s: float  # the same, compressing for each question: N compressions + N questions
    contexts_reused: int  # questions answered from the shared compression (N - 1)
    same_tokens: bool  # both ways generated the same tokens for every question
    kept_tokens: float  # entries per layer and KV head before decoding: the compressed context plus the question
    peak_memory_gb: float | None  # torch.cuda.max_memory_allocated over the timed repeats (GPU only)


_WAYS = ("shared", "recompressed")


def _answer(engine: Engine, requests: list[Request], way: str) -> list:
    """Every question's generation: `shared` in one generate_batch (the context compressed once), `recompressed`
    one generate_batch per question (compressed for each); decoding one question at a time either way."""
    if way == "shared":
        return engine.generate_batch(requests, 1)
    return [engine.generate_batch([request], 1)[0] for request in requests]


def bench_questions_method(model: LoadedModel, method_name: str, options: dict, lengths: list[int], questions: int,
                           question_tokens: int, new_tokens: int, repeats: int, warmup: int, seed: int = 0,
                           mlp_chunk: int | None = None, decode_graphs: str = "auto") -> list[QuestionsRow]:
    """Per length: one random context and `questions` random questions, answered from one compression of the
    context and with a compression per question (the same engine; both decode one question at a time)."""
    method = build_method(method_name, options)
    engine = Engine(model.model, method, model.backend, model.tokenizer, mlp_chunk=mlp_chunk,
                    decode_graphs=decode_graphs)
    vocab, device = model.model.config.vocab_size, model.device
    rows = []
    for length in lengths:
        generator = torch.Generator().manual_seed(seed + length)
        context = torch.randint(0, vocab, (length,), generator=generator)
        requests = [Request(context, new_tokens, suffix_ids=torch.randint(0, vocab, (question_tokens,),
                                                                          generator=generator))
                    for _ in range(questions)]
        for _ in range(warmup):
            for way in _WAYS:
                _answer(engine, requests, way)
        _reset_peak_memory(device)
        walls: dict[str, list[float]] = {way: [] for way in _WAYS}
        generations: dict[str, list] = {}
        for _ in range(repeats):
            for way in _WAYS:  # alternated, so drifting clocks or load touch both alike
                synchronize(device)
                began = time.perf_counter()
                generations[way] = _answer(engine, requests, way)
                synchronize(device)
                walls[way].append(time.perf_counter() - began)
        shared, recompressed = statistics.median(walls["shared"]), statistics.median(walls["recompressed"])
        rows.append(QuestionsRow(
            method=method_name, context_length=length, questions=questions, question_tokens=question_tokens,
            new_tokens=new_tokens, decode_graphs=decode_graphs,
            shared_wall_s=round(shared, 4), shared_wall_s_all=[round(x, 4) for x in walls["shared"]],
            recompressed_wall_s=round(recompressed, 4),
            recompressed_wall_s_all=[round(x, 4) for x in walls["recompressed"]],
            speedup=round(recompressed / shared, 3) if shared > 0 else 0.0,
            shared_prefill_s=round(sum(g.prefill_s for g in generations["shared"]), 4),
            recompressed_prefill_s=round(sum(g.prefill_s for g in generations["recompressed"]), 4),
            contexts_reused=sum(g.context_reused for g in generations["shared"]),
            same_tokens=[g.token_ids for g in generations["shared"]]
            == [g.token_ids for g in generations["recompressed"]],
            kept_tokens=round(generations["shared"][0].kept_tokens, 2), peak_memory_gb=_peak_memory_gb(device),
        ))
        print(json.dumps(asdict(rows[-1])), file=sys.stderr, flush=True)
    return rows


def run_questions_bench(model: LoadedModel, methods: list[tuple[str, dict]], lengths: list[int], questions: int,
                        question_tokens: int, new_tokens: int, repeats: int, warmup: int, seed: int = 0,
                        mlp_chunk: int | None = None, decode_graphs: Sequence[str] = ("auto",)) -> dict:
    rows = []
    for mode in decode_graphs:
        for name, options in methods:
            rows.extend(bench_questions_method(model, name, options, lengths, questions, question_tokens, new_tokens,
                                               repeats, warmup, seed, mlp_chunk, mode))
    return {
        **_environment(model),
        "note": f"random context and {questions} random questions of {question_tokens} tokens; shared = the context "
                "compressed once for every question, recompressed = compressed again for each; both decode one "
                "question at a time, fixed generation length (EOS ignored); medians over repeats",
        "questions": questions, "question_tokens": question_tokens, "repeats": repeats, "warmup": warmup,
        "mlp_chunk": mlp_chunk, "decode_graphs": list(decode_graphs), "rows": [asdict(row) for row in rows],
    }


def format_questions_rows(report: dict) -> str:
    header = ["method", "length", "questions", "shared_s", "recompressed_s", "speedup", "prefill_shared_s",
              "prefill_recompressed_s", "reused", "same_tokens", "peak_GB"]
    cells = [[row["method"], f"{row['context_length']}", f"{row['questions']}", f"{row['shared_wall_s']:.3f}",
              f"{row['recompressed_wall_s']:.3f}", f"{row['speedup']:.2f}x", f"{row['shared_prefill_s']:.3f}",
              f"{row['recompressed_prefill_s']:.3f}", f"{row['contexts_reused']}",
              "yes" if row["same_tokens"] else "no", _peak(row)] for row in report["rows"]]
    return markdown_table(header, cells)


def profile_once(model: LoadedModel, method: tuple[str, dict], length: int, new_tokens: int) -> str:
    """A torch.profiler table (top 25 operators by self time) of one warmed-up run."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model.model, build_method(*method), model.backend, model.tokenizer)
    prompt = torch.randint(0, model.model.config.vocab_size, (length,)).tolist()
    engine.generate(prompt, 4, stop_token_ids=())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        engine.generate(prompt, new_tokens, stop_token_ids=())
    key = "self_cuda_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=25)
