"""Running kvpress beside evalkv: its environment (scripts/kvpress_env.py), its process
(scripts/kvpress_reference.py), and what both sides kept, in one form (docs/methods.md#kvpress).

A comparison is a `Pair`: an evalkv method with the options that set it to kvpress's behaviour, the kvpress press
that computes the same thing, and the prompt; adding a method pair is one entry of a dict of pairs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from evalkv.kv.engine import Engine, Generation
from evalkv.methods import build_method
from evalkv.methods.base import Method

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
RUN_TIMEOUT_S = 900


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kvpress_env = _script("kvpress_env")


@dataclass(frozen=True)
class Pair:
    """One method as evalkv and kvpress run it.

    method, options: evalkv's method and the options that give it kvpress's behaviour (a `Method` instance also works:
        a test-local variant). press: kvpress's press, `{"class": ..., options}` (nested presses as dicts).
    prompt: which prompt of the run (a key of the prompts the caller passes). extra: more of the reference's case
        (DuoAttention's `duo_patterns` / `duo_text`). tokens: greedy tokens that must agree, "all" or "first" (the
        later ones differ by design; the docs say why).
    """

    method: str | Method
    options: dict = field(default_factory=dict)
    press: dict = field(default_factory=dict)
    prompt: str = "text"
    extra: dict = field(default_factory=dict)
    tokens: str = "all"


def environment() -> Path:
    """kvpress's environment folder (built once); skips the calling test, with pip's reason, when it cannot be."""
    try:
        return kvpress_env.build()
    except RuntimeError as error:
        pytest.skip(f"kvpress {kvpress_env.KVPRESS_VERSION}'s environment could not be built from the package "
                    f"registry: {error}")


def run_reference(env: Path, model_folder: Path, pairs: dict[str, Pair], prompts: dict[str, tuple[list, list]],
                  max_new_tokens: int, work: Path, dtype: str = "float32") -> dict:
    """Every pair's press through kvpress in its own process; returns {name: {"kept", "tokens", "error"}} and the
    versions under "_versions"."""
    cases = {}
    for name, pair in pairs.items():
        context, question = prompts[pair.prompt]
        cases[name] = {"press": pair.press, "context_ids": context, "question_ids": question, **pair.extra}
    spec, out = work / "kvpress-spec.json", work / "kvpress-out.json"
    spec.write_text(json.dumps({"model": str(model_folder), "dtype": dtype, "max_new_tokens": max_new_tokens,
                                "cases": cases}))
    command = [sys.executable, str(SCRIPTS / "kvpress_reference.py"), str(spec), str(out)]
    # kvpress's folder alone on the path: nothing of evalkv's worktree, one transformers in the process
    variables = {**os.environ, "PYTHONPATH": str(env), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=variables)
    assert result.returncode == 0, f"the kvpress reference process failed:\n{result.stderr[-4000:]}"
    output = json.loads(out.read_text())
    return {**output["cases"], "_versions": {key: output[key] for key in ("kvpress", "transformers", "torch")}}


def evalkv_run(model, pair: Pair, prompts: dict[str, tuple[list, list]], max_new_tokens: int,
               tokenizer=None) -> Generation:
    """The pair's evalkv side: the context as the prompt, the question fed after its compression, traced."""
    context, question = prompts[pair.prompt]
    method = pair.method if isinstance(pair.method, Method) else build_method(pair.method, dict(pair.options))
    engine = Engine(model, method, tokenizer=tokenizer)
    return engine.generate(context, max_new_tokens, suffix_ids=question, trace=True)


def kept_after_prompt(generation: Generation, prompt_length: int, kv_heads: int) -> list[list[list[int]]]:
    """Per layer and KV head, the prompt positions the first forward after the prompt attended to (what the prompt's
    compression left; a set shared by the layer's heads is repeated per head)."""
    kept = []
    for layer in generation.trace[1]:
        heads = [head[0, 0] for head in layer] if isinstance(layer, list) else [
            layer[0, min(head, layer.shape[1] - 1)] for head in range(kv_heads)]
        kept.append([[p for p in head.tolist() if p < prompt_length] for head in heads])
    return kept


def differences(evalkv_kept: list, kvpress_kept: list) -> list[str]:
    """Human-readable differences of two kept sets, per layer and head."""
    lines = []
    for layer, (ours, theirs) in enumerate(zip(evalkv_kept, kvpress_kept)):
        for head, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                lines.append(f"layer {layer} head {head}: evalkv only {sorted(set(a) - set(b))[:12]}, kvpress only "
                             f"{sorted(set(b) - set(a))[:12]} ({len(a)} vs {len(b)} kept)")
    return lines


def load_saved(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
