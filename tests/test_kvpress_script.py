"""scripts/kvpress_bench.py's parts that need no kvpress (kvpress itself runs in its own environment, see the
script): the pass-through tokenizer, the architecture rebuilt from a workload's config and the cache sizes the script
holds kvpress to. Opt-in (EVALKV_KVPRESS_BENCH=1, half a minute): the script itself in kvpress's environment."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from kvpress_harness import environment

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kvpress_bench.py"
_spec = importlib.util.spec_from_file_location("kvpress_bench", SCRIPT)
kvpress_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kvpress_bench)


def test_pass_through_tokenizer_gives_back_the_ids():
    tokenizer = kvpress_bench.pass_through_tokenizer(300)
    ids = torch.randint(0, 300, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    text = " ".join(f"t{i}" for i in ids)
    assert tokenizer.encode(tokenizer.bos_token + text, add_special_tokens=False) == ids
    assert tokenizer.encode(text + "\n") == ids  # no special tokens added, the question suffix is no token
    assert len(tokenizer) == 300 and tokenizer.chat_template is None
    assert len(tokenizer.decode(ids, skip_special_tokens=True).split()) == len(ids)


def test_the_result_is_written_atomically_with_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        kvpress_bench.write_result(tmp_path / "out" / "kvpress.json", {"wall_s": 1.5})
    finally:
        os.umask(previous)
    written = tmp_path / "out" / "kvpress.json"
    assert json.loads(written.read_text()) == {"wall_s": 1.5}
    assert written.stat().st_mode & 0o777 == 0o640 and [p.name for p in written.parent.iterdir()] == ["kvpress.json"]


def test_model_is_rebuilt_from_the_workload_config():
    model = tiny_model()
    info = {"config": json.loads(model.config.to_json_string()),
            "num_parameters": sum(p.numel() for p in model.parameters())}
    rebuilt = kvpress_bench.build_model(info, torch.float32, torch.device("cpu"), "sdpa", seed=0)
    assert sum(p.numel() for p in rebuilt.parameters()) == info["num_parameters"]
    assert rebuilt.config.num_key_value_heads == model.config.num_key_value_heads
    assert rebuilt.generation_config.eos_token_id is None  # the pipeline never stops early


def test_cache_sizes_follow_the_press_rule():
    """The context keeps min(length, budget); each forward after it (the question's included) adds an entry; with
    DecodingPress every interval-th forward cuts a longer cache back to the target and leaves a shorter one."""
    assert kvpress_bench.expected_cache(63, 8, budget=32) == (32, [], 40)
    assert kvpress_bench.expected_cache(19, 40, budget=32, cuts=(16, 32)) == (19, [(35, 32), (48, 32)], 40)
    assert kvpress_bench.expected_cache(5, 20, budget=32, cuts=(8, 32)) == (5, [(13, 13), (21, 21)], 25)


@pytest.mark.skipif(not os.environ.get("EVALKV_KVPRESS_BENCH"), reason="opt-in, about half a minute on two cores: "
                    "EVALKV_KVPRESS_BENCH=1 (kvpress's environment, scripts/kvpress_env.py)")
@pytest.mark.parametrize("press, cache_at_end, cuts", [("snapkv", [59, 69, 72], 0), ("decoding-snapkv", [40] * 3, 2)])
def test_kvpress_pipeline_holds_the_budget(press, cache_at_end, cuts, tmp_path):
    """A reasoning-shaped workload through kvpress's pipeline: the first 3 of 4 samples, 40 new tokens each. SnapKVPress
    cuts the context to the budget and lets the cache grow; DecodingPress cuts it back to the budget every 16
    forwards (contexts of 19 and 29 tokens decode under DecodingPress alone, 63 under PrefillDecodingPress)."""
    env = environment()
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    samples = [{"task": "reasoning", "max_new_tokens": 8192,
                "prompt_ids": torch.randint(0, model.config.vocab_size, (length,), generator=generator).tolist()}
               for length in (20, 30, 64, 20)]
    workload = {
        "version": 1, "workload": "reasoning", "samples": samples,
        "model": {"name": "random-tiny-llama", "config": json.loads(model.config.to_json_string()),
                  "num_parameters": sum(p.numel() for p in model.parameters())},
        "evalkv": {"methods": {"snapkv": {"budget": 32, "window_size": 8, "kernel_size": 7, "pooling": "max",
                                          "decode_interval": 16, "decode_target": None, "decode_buffer": 12}}},
    }
    workload_path, out = tmp_path / "workload.json", tmp_path / "kvpress.json"
    workload_path.write_text(json.dumps(workload))
    command = [sys.executable, str(SCRIPT), str(workload_path), "-o", str(out), "--device", "cpu", "--dtype",
               "float32", "--press", press, "--samples", "3", "--new-tokens", "40"]
    variables = {**os.environ, "PYTHONPATH": str(env), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=variables)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(out.read_text())
    assert (result["samples"], result["workload"]["samples"], result["generated_tokens"]) == (3, 4, 120)
    assert result["wall_s_per_sample"] == pytest.approx(result["wall_s"] / 3, abs=1e-3)
    assert [sample["kept_after_context"] for sample in result["per_sample"]] == [19, 29, 32]
    assert [sample["cache_at_end"] for sample in result["per_sample"]] == cache_at_end
    assert [sample["cuts"] for sample in result["per_sample"]] == [cuts] * 3
    if press == "decoding-snapkv":
        assert result["largest_cache_tokens"] == 32 + 16
        assert (result["press"]["compression_interval"], result["press"]["target_size"]) == (16, 32)
        assert result["press"]["contexts_compressed"] == 1
