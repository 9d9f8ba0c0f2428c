"""The engine on a CUDA GPU (skipped without one): masked-reference equivalence for every method case, in fp32,
a bf16 run that keeps the compressed cache's shape, and KIVI in bf16. On the GPU machine:
`python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids
from method_cases import CASES, method_name

from evalkv.kv.engine import Engine
from evalkv.kv.reference import masked_reference_logits
from evalkv.methods import build_method
from evalkv.models.presets import build_random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_models: dict = {}


def _model(architecture: str, dtype: torch.dtype):
    key = (architecture, dtype)
    if key not in _models:
        _models[key] = build_random_model(architecture, dtype, torch.device("cuda"), seed=0)
    return _models[key]


@pytest.mark.filterwarnings("ignore:a sequence passed this LongRoPE model")  # tiny-phi3's chunked prefills
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("architecture", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"])
def test_cuda_equivalence_fp32(case, architecture, tokenizer):
    model = _model(architecture, torch.float32)
    # The tokenizer: kvzip's repeat prompt and segment_two_stage's separators need it (as on the CPU).
    generation = Engine(model, build_method(method_name(case), CASES[case]), tokenizer=tokenizer).generate(
        prompt_ids(tokenizer), max_new_tokens=6, trace=True
    )
    reference = masked_reference_logits(
        model, [f[0] for f in generation.forwards], [f[1] for f in generation.forwards], generation.trace
    )
    for (_, _, logits), expected in zip(generation.forwards, reference):
        torch.testing.assert_close(logits, expected.float(), atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", ["snapkv", "h2o", "adakv", "streaming_llm"])
def test_cuda_bf16_runs_and_shrinks(case, tokenizer):
    model = _model("tiny-llama", torch.bfloat16)
    generation = Engine(model, build_method(method_name(case), CASES[case])).generate(prompt_ids(tokenizer), 4)
    assert abs(generation.kept_tokens - 64) <= 1 and len(generation.token_ids) == 4  # AdaKV rounds head budgets


@pytest.mark.parametrize("protocol", ["stream", "chunked"])
def test_cuda_perplexity_matches_the_cpu(protocol, tokenizer):
    """task=perplexity's scoring on the GPU (fp32, the CPU's weights moved over): streaming_llm at budget 16 gives
    the CPU's per-token log-likelihoods, and the full cache transformers' own."""
    from evalkv.kv.protocol import Protocol

    ids = prompt_ids(tokenizer, repeats=3)[:96]
    scoring = Protocol(protocol, 16 if protocol == "chunked" else None)
    cpu_model = build_random_model("tiny-llama", torch.float32, torch.device("cpu"), seed=0)
    cpu = scoring.score(Engine(cpu_model, build_method("streaming_llm", {"budget": 16})), ids)
    gpu_model = cpu_model.to("cuda")
    gpu = scoring.score(Engine(gpu_model, build_method("streaming_llm", {"budget": 16})), ids)
    torch.testing.assert_close(gpu.logprobs, cpu.logprobs, atol=2e-4, rtol=0)
    assert gpu.kept_tokens == 16
    full = scoring.score(Engine(gpu_model, build_method("full", {})), ids)
    gpu_model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        logits = gpu_model(torch.tensor([ids], device="cuda")).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0]
    torch.testing.assert_close(full.logprobs, expected.cpu(), atol=2e-4, rtol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_bf16_kivi_holds_codes_and_decodes_eagerly(bits, tokenizer):
    """KIVI on the GPU in bf16 (docs/methods.md#kivi): scales and zero points in bf16, codes on the device, the bytes
    of the formula, rows decoding as one batch, and decode_graphs=auto falling back to the eager path (bf16 batched
    matmuls may round differently, so tokens are compared with one-at-a-time in fp32 on the CPU, tests/test_kivi.py)."""
    from test_kivi import SNAPKV, expected_bytes

    from evalkv.kv.engine import Request
    from evalkv.kv.quant import Kivi

    kivi = Kivi(bits, group_size=8, residual=16)
    engine = Engine(_model("tiny-llama", torch.bfloat16), build_method("snapkv", SNAPKV), quantization=kivi)
    base = prompt_ids(tokenizer)
    generation = engine.generate(base, 4, keep_session=True)
    layer = generation.session.cache.layers[0]
    assert layer.key_scale.dtype == torch.bfloat16 and layer.key_codes.is_cuda
    assert generation.kv_bytes == 2 * expected_bytes(64, kivi, element=2) and not generation.decode_graph
    together = engine.generate_batch([Request(ids, 4) for ids in (base, base[7:], base[3:])])
    assert [(g.decode_batch, len(g.token_ids), g.decode_graph) for g in together] == [(3, 4, False)] * 3
