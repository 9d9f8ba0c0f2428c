"""Shared fixtures: tiny random-weight models built from configs (no network), the byte tokenizer, shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton's interpreter runs tests/test_scoring_kernels.py on a machine without CUDA; it must be on before triton is
# first imported, which importing evalkv does (transformers imports torch._dynamo, which imports triton).
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from method_cases import TINY_POLICY

import evalkv.methods  # noqa: F401  (registers the methods)
from evalkv.kv import adapter
from evalkv.methods.eviction_policy import EvictionPolicy
from evalkv.models.loader import LoadedModel, stop_token_ids
from evalkv.models.presets import build_random_model, byte_tokenizer

TINY_ARCHITECTURES = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
# Families added later: the adapter's contract tests and tests/test_architectures.py run them (not every test module).
NEW_ARCHITECTURES = ("tiny-qwen3", "tiny-phi3")
SHARED_DATA = Path(os.environ.get("EVALKV_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# One thread per pytest-xdist worker (scripts/test.sh runs one worker per core); two when the suite runs alone.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(items):
    """The slow and heavy tests first: pytest-xdist's workers then end together on short tests, not one of them
    alone on a test of half a minute collected last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None and item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


_models: dict[str, torch.nn.Module] = {}


def triton_kernels(name: str):
    """The Triton kernel module `evalkv.kv.<name>` (compiled on a GPU, else in Triton's interpreter, which is turned
    on above before triton is imported); the calling test skips where triton is missing or neither runs."""
    import importlib

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (tests/conftest.py sets it before triton is imported)")
    return importlib.import_module(f"evalkv.kv.{name}")


@pytest.fixture
def device() -> torch.device:
    """Where a kernel test runs its tensors: the GPU if there is one, else the CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_model(architecture: str = "tiny-llama", seed: int = 0):
    key = f"{architecture}-{seed}"
    if key not in _models:
        _models[key] = build_random_model(architecture, torch.float32, torch.device("cpu"), seed)
    return _models[key]


def tiny_loaded(architecture: str = "tiny-llama") -> LoadedModel:
    model, tok = tiny_model(architecture), byte_tokenizer()
    return LoadedModel(
        name=f"random-{architecture}", model=model, tokenizer=tok, backend="sdpa", max_prompt_length=None,
        stop_token_ids=stop_token_ids(tok, model), description="test",
    )


@pytest.fixture(scope="session", autouse=True)
def tiny_policy():
    """A random-weight learned_mlp policy for the tiny models' geometry (every feature on), at TINY_POLICY."""
    geometry = adapter.geometry(tiny_model())
    EvictionPolicy.initialise(geometry, ["key", "log_position", "value_norm"], [32], seed=0).save(TINY_POLICY)
    yield TINY_POLICY
    TINY_POLICY.unlink(missing_ok=True)
    TINY_POLICY.parent.rmdir()


@pytest.fixture(params=TINY_ARCHITECTURES)
def architecture(request) -> str:
    return request.param


def rotated(cases) -> list[tuple[str, str]]:
    """(case, architecture) pairs, each case on one tiny architecture in turn: every case and every architecture runs,
    at a third of the full grid's cost. For the decode-path matrices (batched, static buffers), whose mechanics do not
    depend on the architecture; the masking equivalence (tests/test_equivalence.py) runs the full grid."""
    return [(case, TINY_ARCHITECTURES[i % len(TINY_ARCHITECTURES)]) for i, case in enumerate(sorted(cases))]


def prompt_ids(tokenizer, repeats: int = 12) -> list[int]:
    return tokenizer("The quick brown fox jumps over the lazy dog. " * repeats)["input_ids"]


def projected_keys(model, sequence: torch.Tensor) -> torch.Tensor:
    """Layer 0's keys before RoPE, `[1, H_kv, n, d]`, as each family computes them: `k_proj` (Llama, Qwen2, Mistral),
    then the per-head `k_norm` (Qwen3), or the key slice of the fused `qkv_proj` (Phi-3)."""
    attention = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(sequence))
    config = model.config
    head_dim, kv_heads = attention.head_dim, config.num_key_value_heads
    if hasattr(attention, "qkv_proj"):
        start = config.num_attention_heads * head_dim
        keys = attention.qkv_proj(hidden)[..., start : start + kv_heads * head_dim]
    else:
        keys = attention.k_proj(hidden)
    keys = keys.view(1, sequence.shape[1], kv_heads, head_dim)
    if hasattr(attention, "k_norm"):
        keys = attention.k_norm(keys)
    return keys.transpose(1, 2)


@pytest.fixture
def dynamo_counters():
    """torch._dynamo's counters from zero over an empty dynamo cache: earlier tests' compiled steps (and dynamo's
    recompile limit, which they count towards) decide nothing here."""
    from torch._dynamo.utils import counters

    from evalkv.kv.graphs import forget_compiled

    torch._dynamo.reset()
    forget_compiled()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    forget_compiled()


@pytest.fixture
def traced_compile(monkeypatch, dynamo_counters):
    """decode_graphs="compile" through dynamo's aot_eager backend: the step is traced and partitioned as inductor would
    receive it, without inductor's code generation (half a minute on two cores the first time). Yields the counters."""
    from evalkv.kv import graphs

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "aot_eager")
    return dynamo_counters


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private EVALKV_CACHE so tests never touch the user's cache."""
    monkeypatch.setenv("EVALKV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
