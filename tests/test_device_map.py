"""`model.device_map`: one model spread over a host's GPUs. On CPU the placement is trivial, so these tests pin that the
option reaches `from_pretrained`, that a run with it writes the same records, and that bad combinations are refused;
tests/test_multi_gpu.py runs the same on two GPUs."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.models.config import ModelConfig
from evalkv.models.loader import load_model
from evalkv.models.presets import byte_tokenizer
from evalkv.records import read_records

RUN = ["model.device=auto", "progress=false", "method=snapkv", "budget=40", "method.window_size=8",
       "task.lengths=[256]", "task.depths=[0,100]"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """random-tiny-llama's weights and tokenizer saved as a hub folder (safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("tiny-llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_device_map_reaches_from_pretrained(tiny_folder, monkeypatch):
    received = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        received.append(kwargs["device_map"])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded = load_model(ModelConfig(name="tiny", source="hub", path=str(tiny_folder), device_map="auto"))
    assert received == ["auto"]
    assert loaded.description.endswith("float32 on cpu (device_map=auto)")


def test_run_with_device_map_writes_the_records_of_the_preset(tiny_folder, tmp_path):
    assert main(["pred", "model=random-tiny-llama", *RUN, f"run_dir={tmp_path / 'preset'}"]) == 0
    assert main(["pred", "model=hf", f"model.path={tiny_folder}", "model.device_map=auto", *RUN,
                 f"run_dir={tmp_path / 'mapped'}"]) == 0
    preset, mapped = (read_records(tmp_path / name / "predictions.jsonl") for name in ("preset", "mapped"))
    timing = {"prefill_s", "decode_s", "decode_batch"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in mapped] == [
        {k: v for k, v in r.items() if k not in timing} for r in preset]
    assert "device_map=auto" in json.loads((tmp_path / "mapped" / "run.json").read_text())["model"]


@pytest.mark.parametrize(("options", "message"), [
    ({"device_map": "gpus"}, "unknown model.device_map 'gpus'; known: auto, balanced, balanced_low_0, sequential"),
    ({"device_map": "auto", "device": "cpu"}, "model.device=cpu and model.device_map=auto both place the model"),
    ({"device_map": "auto", "source": "random", "architecture": "tiny-llama"},
     "model.device_map applies to models loaded from weights"),
])
def test_bad_device_map_is_a_clear_error(tiny_folder, options, message):
    config = {"name": "tiny", "source": "hub", "path": str(tiny_folder), **options}
    with pytest.raises(EvalkvError, match=message):
        load_model(ModelConfig(**config))
