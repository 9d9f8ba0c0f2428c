"""Several GPUs (skipped with fewer than two): the engine with a model's layers on two GPUs generates what it generates
on one, for every method case; `model.device_map=balanced` runs; a two-process torchrun run on two GPUs writes the
records of a one-GPU run. On a multi-GPU machine: `python -m pytest tests/test_multi_gpu.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import CASES, method_name
from transformers import AutoModelForCausalLM

from evalkv.cli import main
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.models.presets import byte_tokenizer
from evalkv.records import read_records

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

TIMING = {"prefill_s", "decode_s"}
# Layer 0 with the embeddings on the first GPU, layer 1 with the head on the second.
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
         "lm_head": 1}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("tiny-llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def placements(tiny_folder):
    """The tiny model in fp32 on one GPU and split over two."""
    one = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32, device_map="cuda:0").eval()
    two = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32, device_map=SPLIT).eval()
    assert {str(p.device) for p in two.parameters()} == {"cuda:0", "cuda:1"}
    return one, two


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in records]


@pytest.mark.parametrize("case", sorted(CASES))
def test_layers_on_two_gpus_generate_what_one_gpu_generates(case, placements, tokenizer):
    prompt = prompt_ids(tokenizer)
    generations = [
        Engine(model, build_method(method_name(case), CASES[case]), tokenizer=tokenizer).generate(prompt, 8)
        for model in placements
    ]
    one, two = generations
    assert two.token_ids == one.token_ids
    assert two.kept_tokens == one.kept_tokens and two.final_kept_tokens == one.final_kept_tokens


def test_pred_with_balanced_device_map(tiny_folder, tmp_path):
    run = tmp_path / "run"
    assert main(["pred", "model=hf", f"model.path={tiny_folder}", "model.device_map=balanced", "progress=false",
                 "method=snapkv", "budget=40", "method.window_size=8", "task.lengths=[256]", f"run_dir={run}"]) == 0
    assert len(read_records(run / "predictions.jsonl")) == 5
    assert "cuda:0, cuda:1 (device_map=balanced)" in json.loads((run / "run.json").read_text())["model"]


def test_two_gpu_processes_write_the_records_of_one(tmp_path):
    overrides = ["model=random-tiny-llama", "progress=false", "method=h2o", "budget=48", "task.lengths=[256,512]",
                 "task.depths=[0,50,100]"]
    assert main(["pred", *overrides, f"run_dir={tmp_path / 'one'}"]) == 0
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                    "evalkv.cli", "pred", *overrides, f"run_dir={tmp_path / 'two'}"], check=True, env=environment)
    one, two = (read_records(tmp_path / name / "predictions.jsonl") for name in ("one", "two"))
    assert len(one) == 6 and _strip(two) == _strip(one)
    assert "processes" in json.loads((tmp_path / "two" / "run.json").read_text())["invocations"][0]
