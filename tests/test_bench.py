"""`evalkv bench`: one row per method x length x batch size, honest about what decoded together; a whole workload
timed end to end."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from evalkv.cli import _workload_method_settings, main
from evalkv.models.presets import BYTE_VOCAB_SIZE
from evalkv.run.bench import weight_bytes
from evalkv.run.workload import build_reasoning_workload, build_workload, read_workload, write_workload
from evalkv.tasks.longbench.spec import ENGLISH_TASKS, MAX_NEW_TOKENS


def test_bench_reports_batched_decoding_and_the_bandwidth_bound(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "method=full,snapkv", "budget=32",
                 "--lengths", "96", "--batch-sizes", "1,3", "--new-tokens", "5", "--repeats", "2",
                 "--warmup", "0", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    rows = {(row["method"], row["batch_size"]): row for row in report["rows"]}
    assert set(rows) == {("full", 1), ("full", 3), ("snapkv", 1), ("snapkv", 3)}
    assert rows["snapkv", 3]["decode_batch"] == 3 and rows["full", 3]["decode_batch"] == 1
    assert rows["full", 1]["kv_bytes_after_prefill"] > rows["snapkv", 1]["kv_bytes_after_prefill"]
    assert rows["snapkv", 1]["kept_tokens"] == 32 and rows["full", 1]["kept_tokens"] == 96
    assert rows["full", 1]["eviction_overhead"] == 0
    assert report["weight_bytes"] > 0 and report["copy_bandwidth_gb_s"] > 0
    for row in rows.values():
        assert len(row["prefill_s_all"]) == 2 * row["batch_size"] and len(row["decode_s_all"]) == 2
        expected_bound = report["hbm_bound_step_s"] / row["decode_step_s"]
        assert abs(row["hbm_bound_fraction"] - expected_bound) <= 1e-4  # the fraction is rounded to 4 decimals
        # With the KV bytes a step reads: the decode batch's mean cache size beside the weights.
        # The report rounds the bandwidth to 0.1 GB/s and the fraction to 4 decimals: the fraction must lie within
        # what those roundings allow (on the CPU it is about 1e-3, where a relative tolerance would fail by rounding).
        kv_read = row["decode_batch"] * (row["kv_bytes_after_prefill"] + row["kv_bytes_final"]) / 2
        bandwidths = [(report["copy_bandwidth_gb_s"] + delta) * 1e9 for delta in (0.05, -0.05)]
        low, high = ((report["hbm_bound_step_s"] + kv_read / bandwidth) / row["decode_step_s"]
                     for bandwidth in bandwidths)
        assert low - 1e-4 <= row["kv_bound_fraction"] <= high + 1e-4
        assert row["kv_bound_fraction"] >= row["hbm_bound_fraction"]
        assert row["throughput_tokens_per_s"] > 0
    table = capsys.readouterr().out
    assert "| snapkv | no | 96 | 3 |" in table and "| full | no | 96 | 3 (decoded 1 at a time) |" in table


def test_a_cell_out_of_device_memory_is_recorded_and_the_grid_goes_on(tmp_path, capsys, monkeypatch):
    """How far one GPU goes (issue 21, goal 5): a method x length that runs out of memory is listed under the table and
    in the JSON, and the cells after it still run, on a fresh engine."""
    import torch

    from evalkv.kv.engine import Engine

    generate_batch = Engine.generate_batch
    engines = []

    def short_of_memory(self, requests, *args, **kwargs):
        engines.append((self.method.name, self))  # kept alive: distinct objects, never a reused id
        if self.method.name == "full" and len(requests[0].prompt_ids) == 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return generate_batch(self, requests, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate_batch", short_of_memory)
    report_path = tmp_path / "bench.json"
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "method=full,snapkv", "budget=32",
                 "--lengths", "128,96", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                 "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert [(row["method"], row["context_length"]) for row in report["rows"]] == [
        ("full", 96), ("snapkv", 128), ("snapkv", 96)]
    [failure] = report["out_of_memory"]
    assert (failure["method"], failure["context_length"], failure["batch_size"]) == ("full", 128, 1)
    assert failure["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    full_engines = [engine for name, engine in engines if name == "full"]
    assert len(full_engines) == 2 and full_engines[0] is not full_engines[1]  # 96 ran on a fresh engine
    assert "full at 128 tokens, batch 1, decode_graphs auto: out of device memory" in capsys.readouterr().out


def test_bench_compares_decode_graph_modes_in_one_run(tmp_path, capsys, traced_compile):
    """Every mode in one report; on the CPU "auto" and "compile" cannot capture graphs, so no row claims it did, and
    "compile" runs its compiled step."""
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--methods", "snapkv",
                 "--budget", "32", "--lengths", "96", "--batch-sizes", "2", "--new-tokens", "12", "--repeats", "1",
                 "--warmup", "0", "--decode-graphs", "off,auto,compile", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["decode_graphs"] == ["off", "auto", "compile"]
    assert [(row["decode_graphs"], row["decode_graph"], row["decode_compiled"]) for row in report["rows"]] == [
        ("off", False, False), ("auto", False, False), ("compile", False, True)]
    assert "| snapkv | no, compiled | 96 | 2 |" in capsys.readouterr().out


def test_bench_times_a_kivi_cache_against_the_full_cache_held_the_same_way(tmp_path, capsys):
    """cache.quant=kivi2 holds every method's cache as KIVI codes: the rows say so, hold fewer bytes than the same
    methods in the model's dtype, and their overhead is against the full cache quantised the same way."""
    rows = {}
    for quant in ("none", "kivi2"):
        report_path = tmp_path / f"{quant}.json"
        assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "method=full,snapkv", "budget=64",
                     f"cache.quant={quant}", "cache.group_size=8", "cache.residual=32", "--lengths", "160",
                     "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "-o", str(report_path)]) == 0
        report = json.loads(report_path.read_text())
        assert (report["cache"] is None) == (quant == "none")
        assert [entry["method"] for entry in report["methods"]] == ["full", "snapkv"]
        assert report["methods"][1]["options"]["budget"] == 64
        rows.update({(row["method"], row["cache"]): row for row in report["rows"]})
    assert set(rows) == {(method, quant) for method in ("full", "snapkv") for quant in ("none", "kivi2")}
    for method in ("full", "snapkv"):
        assert rows[method, "kivi2"]["kv_bytes_after_prefill"] < rows[method, "none"]["kv_bytes_after_prefill"]
        assert rows[method, "kivi2"]["kept_tokens"] == rows[method, "none"]["kept_tokens"]
    assert rows["full", "kivi2"]["eviction_overhead"] == 0 and rows["snapkv", "kivi2"]["eviction_overhead"] is not None
    assert "| snapkv+kivi2 | no | 160 | 1 |" in capsys.readouterr().out


def test_bench_times_a_kivi_cache_in_the_grid_only(capsys):
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "cache.quant=kivi2", "--workload",
                 "reasoning", "--samples", "1"]) != 0
    assert "cache.quant=kivi2 is timed by the length x batch-size grid" in capsys.readouterr().err


def test_bench_rejects_an_unknown_decode_graphs_mode(capsys):
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu",
                 "--decode-graphs", "sometimes"]) != 0
    assert "unknown decode_graphs 'sometimes'; known: auto, off, eager, compile" in capsys.readouterr().err


def test_bench_rejects_a_bad_batch_size(capsys):
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--batch-sizes", "0"]) != 0
    assert "--batch-sizes must be positive" in capsys.readouterr().err


def test_workload_bench_generates_every_sample_max_new_tokens(tmp_path, capsys):
    """The LongBench-shaped workload: 16 tasks x 1 sample, each generating its task's max new tokens (EOS ignored),
    timed end to end; the saved workload carries what scripts/kvpress_bench.py needs."""
    report_path, workload_path = tmp_path / "bench.json", tmp_path / "workload.json"
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--workload", "longbench",
                 "--samples-per-task", "1", "--min-length", "40", "--max-length", "96", "--budget", "32",
                 "--batch-size", "16", "--warmup", "0", "--write-workload", str(workload_path),
                 "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    workload = read_workload(workload_path)
    assert workload["samples"] == build_workload(BYTE_VOCAB_SIZE, 1, 0, 40, 96)["samples"]
    (row,) = report["rows"]
    expected_new_tokens = sum(MAX_NEW_TOKENS[task] for task in ENGLISH_TASKS)
    assert row["method"] == "snapkv" and row["samples"] == 16 and row["mean_decode_batch"] == 16
    assert row["generated_tokens"] == expected_new_tokens == report["workload"]["new_tokens"]
    assert row["prompt_tokens"] == sum(len(s["prompt_ids"]) for s in workload["samples"])
    assert row["kept_tokens"] == 32 and row["wall_s"] > row["prefill_s"] > 0
    assert row["samples_per_s"] == pytest.approx(16 / row["wall_s"], rel=1e-2)
    assert row["generated_tokens_per_s"] == pytest.approx(expected_new_tokens / row["wall_s"], rel=1e-2)
    assert workload["model"]["config"]["num_hidden_layers"] == 2 and workload["model"]["num_parameters"] > 0
    assert workload["evalkv"] == {"methods": {"snapkv": {"budget": 32, "window_size": 32, "kernel_size": 7,
                                                         "pooling": "max"}}}
    out = capsys.readouterr().out
    assert "EOS ignored" in out
    assert f"| snapkv | 32 | 0 | 16 | {row['prompt_tokens']} | {expected_new_tokens} | 16 |" in out


def test_written_workload_carries_the_decoding_cuts():
    """scripts/kvpress_bench.py's DecodingPress mirrors a snapkv that cuts while decoding: the workload file carries
    its interval, target and buffer; a prompt-only method's settings stay as they were."""
    methods = [("snapkv", {"budget": 1024, "decode_interval": 128}), ("h2o", {"budget": 64})]
    settings = _workload_method_settings(methods)
    assert settings == {"snapkv": {"budget": 1024, "window_size": 32, "kernel_size": 7, "pooling": "max",
                                   "decode_interval": 128, "decode_target": None, "decode_buffer": 256},
                        "h2o": {"budget": 64}}


def test_workload_bench_runs_a_saved_workload(tmp_path):
    workload_path, report_path = tmp_path / "workload.json", tmp_path / "bench.json"
    write_workload(workload_path, build_workload(BYTE_VOCAB_SIZE, 1, seed=3, min_length=40, max_length=64))
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--workload", "longbench",
                 "--workload-file", str(workload_path), "--budget", "32", "--batch-size", "16", "--warmup", "0",
                 "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["workload"]["seed"] == 3 and report["rows"][0]["generated_tokens"] == report["workload"]["new_tokens"]


def test_reasoning_workload_bench_reports_its_floor(tmp_path, capsys):
    """Short prompts, a fixed generation length; each row carries the floor of the workload at its batch size, which
    for the full cache counts the prompt plus one token a step of every sample's KV."""
    report_path = tmp_path / "bench.json"
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "method=full,streaming_llm", "budget=16",
                 "--workload", "reasoning", "--samples", "3", "--new-tokens", "4", "--min-length", "20",
                 "--max-length", "40", "--batch-size", "2", "--warmup", "0", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    lengths = [len(s["prompt_ids"]) for s in build_reasoning_workload(BYTE_VOCAB_SIZE, 3, 4, 0, 20, 40)["samples"]]
    assert report["workload"]["workload"] == "reasoning" and report["workload"]["new_tokens"] == 3 * 4
    full, streaming = report["rows"]
    assert full["prompt_tokens"] == sum(lengths) and full["generated_tokens"] == 12
    # 2 layers x 2 KV heads x 16 dims x (key, value) x 4 bytes a token; 3 decode steps a sample, batches (0, 1), (2).
    token_bytes = 2 * 2 * 16 * 2 * 4
    kv = sum((length + step) * token_bytes for length in lengths for step in (1, 2, 3))
    decode_weights = weight_bytes(tiny_model()) - BYTE_VOCAB_SIZE * 64 * 4  # the input embedding is looked up
    assert full["floor"]["decode_bytes"] == (3 + 3) * decode_weights + kv
    assert full["floor"]["all_together_decode_floor_s"] == pytest.approx(
        (3 * decode_weights + kv) / full["floor"]["copy_bandwidth"])
    assert streaming["floor"]["decode_bytes"] < full["floor"]["decode_bytes"]  # it holds 16 tokens, prompts 20-40
    for row in (full, streaming):
        floor = row["floor"]
        assert floor["floor_s"] == pytest.approx(floor["prefill_floor_s"] + floor["decode_floor_s"])
        assert floor["peak_flops"] > 0 and floor["copy_bandwidth"] > 0 and floor["prefill_flops"] > 0
        # of_floor is rounded to 4 decimals, from the wall time before it was rounded to 3.
        low, high = (floor["floor_s"] / (row["wall_s"] + delta) for delta in (5e-4, -5e-4))
        assert low - 1e-4 <= row["of_floor"] <= high + 1e-4
    out = capsys.readouterr().out
    assert "| wall_s | floor_s | of_floor |" in out and "reasoning workload" in out


def test_workload_rows_of_several_decode_modes_say_their_mode(tmp_path, capsys):
    """`--decode-graphs eager,off`: one row per method and mode; the table names the mode, or the rows read alike.
    Decoding SnapKV's rows of short prompts decode together on both paths (padded under its cuts)."""
    report_path = tmp_path / "bench.json"
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "method=snapkv", "budget=16",
                 "snapkv.window_size=4", "snapkv.decode_interval=3", "--workload", "reasoning", "--samples", "3",
                 "--new-tokens", "12", "--min-length", "8", "--max-length", "14", "--batch-size", "3",
                 "--decode-graphs", "eager,off", "--warmup", "0", "-o", str(report_path)]) == 0
    rows = json.loads(report_path.read_text())["rows"]
    assert [(row["method"], row["decode_graphs"], row["mean_decode_batch"]) for row in rows] == [
        ("snapkv", "eager", 3), ("snapkv", "off", 3)]
    out = capsys.readouterr().out
    assert "| snapkv (eager) | 16 |" in out and "| snapkv (off) | 16 |" in out


def test_a_workload_file_of_the_other_workload_is_refused(tmp_path, capsys):
    path = tmp_path / "reasoning.json"
    write_workload(path, build_reasoning_workload(BYTE_VOCAB_SIZE, 1, 2, min_length=8, max_length=8))
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "--workload", "longbench",
                 "--workload-file", str(path)]) != 0
    assert "holds a reasoning workload, not longbench; give --workload reasoning" in capsys.readouterr().err


def test_questions_bench_times_one_compression_against_one_per_question(tmp_path, capsys):
    """Both ways answer the same questions with the same tokens; only the shared way reuses the compressed context."""
    report_path = tmp_path / "bench.json"
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", "method=full,snapkv", "budget=32",
                 "--questions", "3", "--question-tokens", "8", "--lengths", "96", "--new-tokens", "4",
                 "--repeats", "2", "--warmup", "0", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert (report["questions"], report["question_tokens"], report["repeats"]) == (3, 8, 2)
    assert [row["method"] for row in report["rows"]] == ["full", "snapkv"]
    for row in report["rows"]:
        assert (row["context_length"], row["questions"], row["new_tokens"]) == (96, 3, 4)
        assert row["contexts_reused"] == 2 and row["same_tokens"]
        assert len(row["shared_wall_s_all"]) == len(row["recompressed_wall_s_all"]) == 2
        assert row["speedup"] == pytest.approx(row["recompressed_wall_s"] / row["shared_wall_s"], rel=1e-2)
    assert [row["kept_tokens"] for row in report["rows"]] == [96 + 8, 32 + 8]  # the question is kept whole
    row = report["rows"][1]
    assert f"| snapkv | 96 | 3 | {row['shared_wall_s']:.3f} | {row['recompressed_wall_s']:.3f} |" in \
        capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (["--batch-size", "4"], "--batch-size cannot be used with the length x batch-size grid"),
    (["--questions", "3", "--batch-sizes", "2"], "--batch-sizes cannot be used with --questions"),
    (["--question-tokens", "8"], "--question-tokens cannot be used with the length x batch-size grid"),
    (["--questions", "1"], "--questions must be at least 2"),
    (["--questions", "2", "--workload", "longbench"], "--workload and --questions are two modes"),
    (["--workload", "longbench", "--lengths", "96"], "--lengths cannot be used with --workload"),
    (["--workload", "longbench", "--workload-file", "w.json", "--samples-per-task", "2"],
     "--samples-per-task: the workload comes from --workload-file"),
    (["--workload", "longbench", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--workload", "longbench", "--new-tokens", "8"], "--new-tokens cannot be used with --workload longbench: each "
     "sample generates its task's max new tokens"),
    (["--workload", "longbench", "--samples", "8"], "--samples cannot be used with --workload longbench"),
    (["--workload", "reasoning", "--samples-per-task", "2"], "--samples-per-task cannot be used with --workload "
     "reasoning"),
    (["--samples", "8"], "--samples cannot be used with the length x batch-size grid"),
    (["--workload", "reasoning", "--workload-file", "w.json", "--new-tokens", "8"],
     "--new-tokens: the workload comes from --workload-file"),
    (["--workload", "reasoning", "--samples", "0"], "--samples must be at least 1"),
])
def test_bench_refuses_options_of_the_other_mode(arguments, message, capsys):
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", *arguments]) != 0
    assert message in capsys.readouterr().err
