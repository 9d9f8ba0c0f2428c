#!/usr/bin/env python3
"""Run kvpress presses on one prompt and record what each kept and generated: the reference side of evalkv's
comparison with kvpress (tests/test_kvpress_reference.py). Runs in kvpress's own environment
(scripts/kvpress_env.py) and imports no evalkv:

    PYTHONPATH=$(python scripts/kvpress_env.py) python scripts/kvpress_reference.py SPEC.json OUT.json

SPEC.json: `model` (a folder saved with save_pretrained, tokenizer files included), `dtype`, `max_new_tokens` and
`cases`: name -> {"press": PRESS, "context_ids": [...], "question_ids": [...] (at least one token), ...} where PRESS is
{"class": "<kvpress press class>", <its options>}, an option that is itself such a dict being built as a press
(`{"class": "AdaKVPress", "press": {"class": "SnapKVPress", ...}}`). DuoAttentionPress cases name where its head
scores come from: `duo_patterns` (a folder with the authors' `config.json` and `full_attention_heads.tsv`, served to
kvpress's own loader in place of its GitHub download) or `duo_text` (the on-the-fly mode, kvpress's
`duo_attention_on_the_fly`, over this one text in place of the 50 BookSum chapters it would download and average).

Each case runs as kvpress's pipeline runs a context and a question (kvpress/pipeline.py at 0.5.5): the context
through the model's decoder inside the press's context manager (a fresh DynamicCache), then the question at positions
after the context, then greedy decoding with explicit positions; no stop token ends it.

What a press kept, per layer and KV head, as positions of the context: kvpress presses compress in a forward hook on
each attention layer, by gathering the kept keys and values into the cache (ScorerPress and its kin) and/or by
naming entries to mask in `module.masked_key_indices` (AdaKVPress, DuoAttentionPress, KVzipPress, which keep the
whole cache and replace masked keys by keys no query attends to). A hook registered before the press's takes each
layer's keys as the prefill's attention left them (the cache passed to this case only); after the prefill, each key
left in the cache is found among those by exact equality (a gather copies bits; every context key is distinct, which
is checked), and the masked entries are removed. This reads any press without knowing how it scores.

OUT.json: {"kvpress", "transformers", "torch", "cases": {name: {"kept": [[positions per KV head] per layer],
"tokens": [ids], "error": null or the exception}}}.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import kvpress_env

kvpress_env.prepare_imports()

import torch  # noqa: E402


def build_press(spec: dict):
    """A press from {"class": name, **options}; options that are such dicts become presses too."""
    import kvpress

    options = {key: build_press(value) if isinstance(value, dict) and "class" in value else value
               for key, value in spec.items() if key != "class"}
    return getattr(kvpress, spec["class"])(**options)


@contextmanager
def duo_scores_from(case: dict, model):
    """DuoAttentionPress's head scores from a local folder or a text, through kvpress's own loading code."""
    from kvpress.presses import duo_attention_press as duo

    saved = (duo.requests.get, duo.load_dataset, duo.duo_attention_on_the_fly, model.config.name_or_path)
    duo.cache.clear()  # kvpress caches patterns by model name
    try:
        if "duo_patterns" in case:
            folder = Path(case["duo_patterns"])

            class Response:
                def __init__(self, url: str):
                    self.text = (folder / url.rsplit("/", 1)[-1]).read_text()

                def json(self):
                    return json.loads(self.text)

            duo.requests.get = Response
            model.config.name_or_path = next(iter(duo.PATTERNS_DICT))  # kvpress looks patterns up by model name
        if "duo_text" in case:
            import pandas

            class Texts:
                def to_pandas(self):
                    return pandas.DataFrame({"chapter": [case["duo_text"]]})

            duo.load_dataset = lambda *args, **kwargs: Texts()
            # kvpress averages over 50 sampled chapters: one text, once, is the same average at a 50th of the cost
            duo.duo_attention_on_the_fly = functools.partial(saved[2], num_samples=1)
        yield
    finally:
        duo.requests.get, duo.load_dataset, duo.duo_attention_on_the_fly, model.config.name_or_path = saved
        duo.cache.clear()


def kept_positions(model, cache, before: dict) -> list[list[list[int]]]:
    """Per layer and KV head, the context positions whose entries the press left attendable (see the docstring)."""
    kept = []
    for layer in model.model.layers:
        module = layer.self_attn
        keys_before, keys_after = before[module.layer_idx][0], cache.layers[module.layer_idx].keys[0]
        masked = getattr(module, "masked_key_indices", None)
        heads = []
        for head in range(keys_before.shape[0]):
            index = {row.numpy().tobytes(): position for position, row in enumerate(keys_before[head].float())}
            if len(index) != keys_before.shape[1]:
                raise RuntimeError(f"layer {module.layer_idx} head {head}: two context keys are equal")
            positions = [index[row.numpy().tobytes()] for row in keys_after[head].float()]
            if masked is not None:
                batch, heads_masked, entries = (part.tolist() for part in masked)
                hidden = {e for b, h, e in zip(batch, heads_masked, entries) if b == 0 and h == head}
                positions = [p for i, p in enumerate(positions) if i not in hidden]
            heads.append(sorted(positions))
        kept.append(heads)
    return kept


@torch.inference_mode()
def run_case(model, case: dict, context: torch.Tensor, question: torch.Tensor, max_new_tokens: int) -> dict:
    from transformers import DynamicCache

    cache = DynamicCache()
    before: dict[int, torch.Tensor] = {}

    def snapshot(module, args, kwargs, output):
        if kwargs.get("past_key_values") is cache and module.layer_idx not in before:
            before[module.layer_idx] = cache.layers[module.layer_idx].keys.clone()

    hooks = [layer.self_attn.register_forward_hook(snapshot, with_kwargs=True) for layer in model.model.layers]
    press = build_press(case["press"])
    try:
        with duo_scores_from(case, model), press(model):
            model.model(input_ids=context, past_key_values=cache)
    finally:
        for hook in hooks:
            hook.remove()
    kept = kept_positions(model, cache, before)
    length = context.shape[1]
    positions = torch.arange(length, length + question.shape[1]).unsqueeze(0)
    logits = model(input_ids=question, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
    tokens = [int(logits[0, -1].argmax())]
    position = int(positions[0, -1]) + 1
    for step in range(max_new_tokens - 1):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                       position_ids=torch.tensor([[position + step]])).logits
        tokens.append(int(logits[0, -1].argmax()))
    return {"kept": kept, "tokens": tokens, "error": None}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.exit("usage: kvpress_reference.py SPEC.json OUT.json")
    spec = json.loads(Path(argv[0]).read_text())
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec.get("dtype", "float32")),
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    cases = {}
    for name, case in spec["cases"].items():
        context, question = torch.tensor([case["context_ids"]]), torch.tensor([case["question_ids"]])
        try:
            cases[name] = run_case(model, case, context, question, spec["max_new_tokens"])
        except Exception:  # one press failing is recorded; the others still run
            cases[name] = {"kept": None, "tokens": None, "error": traceback.format_exc(limit=6)}
    result = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__,
              "cases": cases}
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
