"""The embedded real model (Qwen2.5-Coder-0.5B-Instruct GGUF): assembly, checksum, loading, passkey retrieval.

Loading it takes about a minute on two CPU cores the first time (assembly and de-quantisation, then cached)."""

from __future__ import annotations

import pytest

from evalkv.errors import EvalkvError
from evalkv.models import embedded

pytestmark = pytest.mark.slow


def _parts_installed() -> bool:
    try:
        embedded._part_files()
    except EvalkvError:
        return False
    return True


needs_parts = pytest.mark.skipif(not _parts_installed(), reason="evalkv[model] part packages not installed")


def test_damaged_parts_fail_the_checksum_and_leave_nothing(tmp_path, monkeypatch):
    fake = tmp_path / "part.bin"
    fake.write_bytes(b"not a model")
    monkeypatch.setattr(embedded, "_part_files", lambda: [fake] * 6)
    monkeypatch.setenv("EVALKV_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EvalkvError, match="sha256"):
        embedded.embedded_gguf()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_wrong_override_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"x" * 100)
    monkeypatch.setenv("EVALKV_EMBEDDED_GGUF", str(fake))
    with pytest.raises(EvalkvError, match="is not the embedded model"):
        embedded.embedded_gguf()


@needs_parts
def test_embedded_model_retrieves_passkeys_with_the_full_cache_and_snapkv():
    from evalkv.kv.engine import Engine
    from evalkv.methods import build_method
    from evalkv.metrics.passkey import passkey_correct
    from evalkv.models.config import ModelConfig
    from evalkv.models.loader import load_model
    from evalkv.tasks import build_task

    model = load_model(ModelConfig(name="qwen2.5-coder-0.5b-instruct", source="embedded", device="cpu"))
    assert model.model.config.num_hidden_layers == 24 and model.model.config.num_key_value_heads == 2
    assert embedded.sha256_of(embedded.embedded_gguf()) == embedded.SHA256
    samples = list(build_task("passkey", {"lengths": [256], "depths": [10, 90]}).samples(model))
    # The full cache at one depth, SnapKV at both ends (it keeps half of the prompt and must keep the passkey wherever
    # it is); 256 tokens: each prefill takes seconds on one CPU thread
    for method, options, cases in (("full", {}, samples[1:]), ("snapkv", {"budget": 128}, samples)):
        engine = Engine(model.model, build_method(method, options), model.backend)
        for sample in cases:
            generation = engine.generate(sample.prompt_ids, 10, model.stop_token_ids)
            assert passkey_correct(model.decode(generation.token_ids), sample.answers[0]) == 1.0, method
