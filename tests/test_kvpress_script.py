"""scripts/kvpress_bench.py's parts that need no kvpress (kvpress itself runs in its own environment, see the
script): the pass-through tokenizer and the architecture rebuilt from a workload's config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from conftest import tiny_model

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


def test_model_is_rebuilt_from_the_workload_config():
    model = tiny_model()
    info = {"config": json.loads(model.config.to_json_string()),
            "num_parameters": sum(p.numel() for p in model.parameters())}
    rebuilt = kvpress_bench.build_model(info, torch.float32, torch.device("cpu"), "sdpa", seed=0)
    assert sum(p.numel() for p in rebuilt.parameters()) == info["num_parameters"]
    assert rebuilt.config.num_key_value_heads == model.config.num_key_value_heads
    assert rebuilt.generation_config.eos_token_id is None  # the pipeline never stops early
