"""`evalkv bench`: prefill time, eviction overhead, decode speed, time to first token, peak memory and KV bytes held,
per method x context length, with warm-up and repeated runs.

Prompts are random token ids and generation has a fixed length (end-of-turn tokens are ignored), so a random-weight
architecture preset measures speed and memory honestly; the report says so. Eviction overhead is the method's
prefill time minus the full cache's on the same prompt, as a fraction of the full cache's prefill time.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

import evalkv
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.models.loader import LoadedModel


@dataclass
class BenchRow:
    method: str
    context_length: int
    batch_size: int
    new_tokens: int
    prefill_s: float  # median over repeats; prompt forward(s) with eviction, to the first token (= TTFT)
    prefill_s_all: list[float]
    eviction_overhead: float | None  # (prefill - full prefill) / full prefill
    decode_tokens_per_s: float  # median, per sequence
    decode_s_all: list[float]
    peak_memory_gb: float | None  # torch.cuda.max_memory_allocated over the run (GPU only)
    kv_bytes_after_prefill: int
    kv_bytes_final: int
    kept_tokens: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(
    model: LoadedModel, method_name: str, options: dict, lengths: list[int], new_tokens: int, repeats: int,
    warmup: int, seed: int,
) -> list[BenchRow]:
    method = build_method(method_name, options)
    engine = Engine(model.model, method, model.backend, model.tokenizer)
    vocab = model.model.config.vocab_size
    device = model.device
    rows = []
    for length in lengths:
        generator = torch.Generator().manual_seed(seed + length)
        prompt = torch.randint(0, vocab, (length,), generator=generator).tolist()
        for _ in range(warmup):
            engine.generate(prompt, min(new_tokens, 4), stop_token_ids=())
        prefill, decode = [], []
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            _synchronize(device)
            generation = engine.generate(prompt, new_tokens, stop_token_ids=())
            prefill.append(generation.prefill_s)
            decode.append(generation.decode_s)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        decode_median = statistics.median(decode)
        rows.append(BenchRow(
            method=method_name, context_length=length, batch_size=1, new_tokens=new_tokens,
            prefill_s=round(statistics.median(prefill), 4), prefill_s_all=[round(x, 4) for x in prefill],
            eviction_overhead=None,
            decode_tokens_per_s=round((new_tokens - 1) / decode_median, 2) if decode_median > 0 else float("inf"),
            decode_s_all=[round(x, 4) for x in decode], peak_memory_gb=None if peak is None else round(peak, 3),
            kv_bytes_after_prefill=generation.kv_bytes, kv_bytes_final=generation.final_kv_bytes,
            kept_tokens=round(generation.kept_tokens, 2),
        ))
        print(json.dumps(asdict(rows[-1])), file=sys.stderr, flush=True)
    return rows


def add_overheads(rows: list[BenchRow]) -> None:
    full = {row.context_length: row.prefill_s for row in rows if row.method == "full"}
    for row in rows:
        if row.context_length in full and full[row.context_length] > 0:
            row.eviction_overhead = round((row.prefill_s - full[row.context_length]) / full[row.context_length], 4)


def run_bench(model: LoadedModel, methods: list[tuple[str, dict]], lengths: list[int], new_tokens: int,
              repeats: int, warmup: int, seed: int = 0) -> dict:
    rows: list[BenchRow] = []
    for name, options in methods:
        rows.extend(bench_method(model, name, options, lengths, new_tokens, repeats, warmup, seed))
    add_overheads(rows)
    device = model.device
    return {
        "evalkv": evalkv.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model.description, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "random prompt ids; fixed generation length (end-of-turn tokens ignored); medians over repeats",
        "rows": [asdict(row) for row in rows],
    }


def format_rows(report: dict) -> str:
    header = ["method", "length", "prefill_s", "overhead", "decode_tok/s", "peak_GB", "kv_MB", "kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        overhead = "-" if row["eviction_overhead"] is None else f"{100 * row['eviction_overhead']:.1f}%"
        peak = "-" if row["peak_memory_gb"] is None else f"{row['peak_memory_gb']:.2f}"
        lines.append(
            f"| {row['method']} | {row['context_length']} | {row['prefill_s']:.3f} | {overhead} | "
            f"{row['decode_tokens_per_s']:.1f} | {peak} | {row['kv_bytes_after_prefill'] / 2**20:.1f} | "
            f"{row['kept_tokens']:g} |"
        )
    return "\n".join(lines) + "\n"


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
