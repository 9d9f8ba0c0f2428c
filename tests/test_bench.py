"""`evalkv bench`: one row per method x length x batch size, honest about what decoded together."""

from __future__ import annotations

import json

from evalkv.cli import main


def test_bench_reports_batched_decoding_and_the_bandwidth_bound(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--methods", "full,snapkv",
                 "--budget", "32", "--lengths", "96", "--batch-sizes", "1,3", "--new-tokens", "5", "--repeats", "2",
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
        assert row["throughput_tokens_per_s"] > 0
    table = capsys.readouterr().out
    assert "| snapkv | no | 96 | 3 |" in table and "| full | no | 96 | 3 (decoded 1 at a time) |" in table


def test_bench_compares_decode_graph_modes_in_one_run(tmp_path):
    """Both modes in one report; on the CPU "auto" cannot capture graphs, so no row claims it did."""
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--methods", "snapkv",
                 "--budget", "32", "--lengths", "96", "--batch-sizes", "2", "--new-tokens", "12", "--repeats", "1",
                 "--warmup", "0", "--decode-graphs", "off,auto", "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["decode_graphs"] == ["off", "auto"]
    assert [(row["decode_graphs"], row["decode_graph"]) for row in report["rows"]] == [("off", False), ("auto", False)]


def test_bench_rejects_an_unknown_decode_graphs_mode(capsys):
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu",
                 "--decode-graphs", "sometimes"]) != 0
    assert "unknown decode_graphs 'sometimes'; known: auto, off, eager" in capsys.readouterr().err


def test_bench_rejects_a_bad_batch_size(capsys):
    assert main(["bench", "--model", "random-tiny-llama", "--model-option", "device=cpu", "--batch-sizes", "0"]) != 0
    assert "--batch-sizes must be positive" in capsys.readouterr().err
