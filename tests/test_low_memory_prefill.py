"""Low-memory prefill (issue 8): the MLP runs over chunks of the prompt, computing the same thing."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method


@pytest.mark.parametrize("method,options", [("full", {}), ("snapkv", {"budget": 64, "window_size": 8})])
def test_chunked_mlp_generates_what_the_whole_prompt_mlp_generates(method, options, tokenizer):
    model = tiny_model("tiny-qwen2")
    ids = prompt_ids(tokenizer)
    whole = Engine(model, build_method(method, options)).generate(ids, 6, trace=True)
    seen: list[int] = []
    hook = model.get_decoder().layers[0].mlp.down_proj.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    try:
        chunked = Engine(model, build_method(method, options), mlp_chunk=50).generate(ids, 6, trace=True)
    finally:
        hook.remove()
        Engine(model, build_method("full", {}))  # back to whole-prompt MLPs for the other tests
    assert chunked.token_ids == whole.token_ids
    torch.testing.assert_close(chunked.forwards[0][2], whole.forwards[0][2], rtol=1e-5, atol=1e-5)
    assert len(ids) > 50 and max(seen) == 50 and sum(seen[: -5]) == len(ids)


def test_mlp_chunk_must_be_positive():
    with pytest.raises(EvalkvError, match="MLP chunk must be a positive number"):
        Engine(tiny_model(), build_method("full", {}), mlp_chunk=0)
