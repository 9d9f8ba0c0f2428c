#!/usr/bin/env python3
"""kvpress's pipeline on evalkv's LongBench-shaped workload: the baseline of issue 8's end-to-end speed goal.

Reads the workload that `evalkv bench --workload longbench --write-workload FILE` wrote (the prompt ids, each
sample's max new tokens, the model's config, evalkv's SnapKV budget and window; `--workload reasoning` writes the same
format), builds the same architecture with random weights, runs every sample through kvpress's
`kv-press-text-generation` pipeline with `SnapKVPress`, times the whole workload end to end and writes a JSON result.
It imports only torch, transformers, tokenizers and kvpress (no evalkv), so it runs in kvpress's own environment;
kvpress 0.5.5 requires transformers < 5.3:

    python3 -m pip install -q --no-index --no-deps --target /tmp/kvp .device/kvpress_whl/*.whl
    PYTHONPATH=/tmp/kvp python3 scripts/kvpress_bench.py WORKLOAD.json -o kvpress.json

or, where the package registry is reachable, with the environment scripts/kvpress_env.py builds (and caches):

    PYTHONPATH=$(python scripts/kvpress_env.py) python scripts/kvpress_bench.py WORKLOAD.json -o kvpress.json

How a sample meets the pipeline (kvpress 0.5.5, kvpress/pipeline.py):
- Text in, ids out: the pipeline takes text, so a pass-through tokenizer (a WordLevel vocabulary "t0".."t{V-1}",
  whitespace split, no special tokens, no chat template) turns "t12 t7 ..." back into exactly the workload's ids,
  which is asserted on the first sample. Without a chat template the pipeline prepends `tokenizer.bos_token` to the
  context; the tokenizer's is the empty string, so nothing is prepended: the workload's ids are the whole prompt, as
  evalkv feeds them.
- Context and question: the pipeline compresses the context, then feeds the question uncompressed and generates.
  The context is the prompt without its last token and the question is that last token (the pipeline's "\\n"
  question suffix is whitespace, so no token). evalkv compresses the whole prompt.
- Budget: SnapKVPress keeps `int(context_length * (1 - compression_ratio))` entries per layer and KV head, its
  observation window included (the window's scores are padded above every other score, so it is always kept):
  the same count as evalkv's `budget`, window included. Each sample gets the ratio 1 - (budget + 0.5) / context
  length, which keeps exactly `budget` (checked with kvpress's `compute_n_kept`); a context of at most `budget`
  tokens is left alone (ratio 0), as evalkv leaves such a prompt; every sample's compressed context is checked to
  hold exactly that. Differences that remain: the uncompressed question token adds one entry, so while
  decoding kvpress's cache holds one entry per head more than evalkv's; kvpress's observation window is the
  context's last W tokens, prompt[-W-1:-1], evalkv's the prompt's last W. SnapKVPress's window and pooling kernel
  default to evalkv's snapkv settings from the workload file; kvpress always average-pools (evalkv's default is
  max), averages the window's attention over its queries (evalkv sums; the ranking is the same) and pools each
  query head before averaging over the GQA group (evalkv reduces the group first by default).
- Stopping: the pipeline's greedy loop stops at `model.generation_config.eos_token_id`; it is set to None, so every
  sample generates exactly its max new tokens (checked: each answer decodes to that many tokens).
- Timing: one warm-up call on the first sample (4 new tokens), then the device is synchronised, every sample goes
  through the pipeline one after another (it runs one context at a time), and the device is synchronised again;
  the model's construction is excluded, the pipeline's own tokenisation of the text is included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch


def pass_through_tokenizer(vocab_size: int):
    """Word "t<id>" is token <id>, for every id of the vocabulary; nothing else, no special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The pipeline prepends bos_token to the context when there is no chat template: an empty one adds nothing.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="")


def build_model(model_info: dict, dtype: torch.dtype, device: torch.device, attn_implementation: str, seed: int):
    """The workload's architecture with seeded random weights; generation never stops at an EOS token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(model_info["config"])
    model_type = fields.pop("model_type")
    for key in ("transformers_version", "dtype", "torch_dtype", "architectures"):
        fields.pop(key, None)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    parameters = sum(p.numel() for p in model.parameters())
    if parameters != model_info["num_parameters"]:
        sys.exit(f"the model built here has {parameters} parameters, evalkv's had {model_info['num_parameters']}: "
                 "the config did not carry over between the transformers versions")
    model.generation_config.eos_token_id = None  # the pipeline's only stopping rule
    return model.eval()


def compression_ratio(context_length: int, budget: int) -> float:
    """The ratio at which SnapKVPress keeps exactly `budget` of `context_length` entries (0: leave it alone)."""
    from kvpress.utils import compute_n_kept

    if context_length <= budget:
        return 0.0
    ratio = 1 - (budget + 0.5) / context_length
    assert compute_n_kept(context_length, ratio) == budget, (context_length, budget, ratio)
    return ratio


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", help="the workload JSON written by evalkv bench --write-workload")
    parser.add_argument("-o", "--output", required=True, help="the JSON result to write")
    parser.add_argument("--budget", type=int, help="entries kept per layer and KV head, window included "
                        "(default: evalkv's snapkv budget in the workload)")
    parser.add_argument("--window-size", type=int, help="SnapKV observation window (default: evalkv's snapkv)")
    parser.add_argument("--kernel-size", type=int, help="SnapKV pooling kernel (default: evalkv's snapkv)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the workload (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    options = parser.parse_args(argv)

    import kvpress_env  # this script's folder: keeps evalkv's own packages out of kvpress's transformers

    kvpress_env.prepare_imports()
    import kvpress
    import transformers
    from kvpress import SnapKVPress

    workload = json.loads(Path(options.workload).read_text())
    if "model" not in workload:
        sys.exit(f"{options.workload} has no model config: write it with evalkv bench --write-workload")
    snapkv = workload.get("evalkv", {}).get("methods", {}).get("snapkv", {})
    budget = options.budget or snapkv.get("budget")
    window_size = options.window_size or snapkv.get("window_size")
    kernel_size = options.kernel_size or snapkv.get("kernel_size")
    if None in (budget, window_size, kernel_size) or budget < window_size:
        sys.exit(f"need budget >= window size and a kernel size (the workload's evalkv snapkv settings or --budget, "
                 f"--window-size, --kernel-size); got {budget}, {window_size}, {kernel_size}")
    samples = workload["samples"]
    if min(len(sample["prompt_ids"]) for sample in samples) < 2:
        sys.exit("every prompt needs at least 2 tokens (a context and a question)")

    device = torch.device(options.device)
    model = build_model(workload["model"], getattr(torch, options.dtype), device, options.attn_implementation,
                        options.seed)
    tokenizer = pass_through_tokenizer(workload["model"]["config"]["vocab_size"])
    pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=device)

    def text_of(ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    calls = [(text_of(s["prompt_ids"][:-1]), text_of(s["prompt_ids"][-1:]), s["max_new_tokens"],
              compression_ratio(len(s["prompt_ids"]) - 1, budget)) for s in samples]

    def run(call, max_new_tokens=None, cache=None) -> str:
        context, question, new_tokens, ratio = call
        press = SnapKVPress(compression_ratio=ratio, window_size=window_size, kernel_size=kernel_size)
        return pipe(context, question=question, press=press, max_new_tokens=max_new_tokens or new_tokens,
                    cache=cache)["answer"]

    # The pipeline sees exactly the workload's ids: its own preprocessing of the first sample.
    preprocess_options, _, _ = pipe._sanitize_parameters(question=calls[0][1])
    inputs = pipe.preprocess(calls[0][0], **preprocess_options)
    seen = inputs["context_ids"][0].tolist() + inputs["questions_ids"][0][0].tolist()
    assert seen == samples[0]["prompt_ids"], "the pipeline's token ids differ from the workload's"

    run(calls[0], max_new_tokens=min(4, calls[0][2]))  # warm-up
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    walls = []
    for _ in range(options.repeats):
        answers, kept = [], []
        synchronize(device)
        began = time.perf_counter()
        for call in calls:
            # The pipeline's own default is a fresh DynamicCache per call; passing it lets us read what was kept
            # (the pipeline cuts the question and the answer off again, leaving the compressed context).
            cache = transformers.DynamicCache()
            answers.append(run(call, cache=cache))
            kept.append(cache.get_seq_length())
        synchronize(device)
        walls.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    generated = [len(answer.split()) for answer in answers]
    short = [i for i, (count, s) in enumerate(zip(generated, samples)) if count != s["max_new_tokens"]]
    if short:
        sys.exit(f"samples {short[:5]} did not generate their max new tokens")
    off_budget = [i for i, (count, s) in enumerate(zip(kept, samples))
                  if count != min(budget, len(s["prompt_ids"]) - 1)]
    if off_budget:
        sys.exit(f"samples {off_budget[:5]} kept {[kept[i] for i in off_budget[:5]]} entries, not budget {budget}")

    wall = statistics.median(walls)
    result = {
        "kvpress": version("kvpress"), "kvpress_path": str(Path(kvpress.__file__).parent),
        "transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": workload["model"]["name"], "num_parameters": workload["model"]["num_parameters"],
                  "dtype": options.dtype, "attn_implementation": options.attn_implementation, "seed": options.seed},
        "press": {"name": "SnapKVPress", "budget": budget, "window_size": window_size, "kernel_size": kernel_size,
                  "compression_ratio": "per sample: 1 - (budget + 0.5) / context length (0 when it fits)"},
        "note": "kvpress pipeline, one sample at a time; context = prompt[:-1] (compressed), question = prompt[-1]; "
                "EOS never stops generation (generation_config.eos_token_id = None): every sample generates its "
                "max new tokens; wall time = every sample's pipeline call (tokenisation, prefill, compression, "
                "decode), model build excluded; median over repeats",
        "workload": {"file": str(options.workload), "seed": workload.get("seed")},
        "samples": len(samples), "prompt_tokens": sum(len(s["prompt_ids"]) for s in samples),
        "generated_tokens": sum(generated), "kept_tokens": round(statistics.mean(kept), 2),
        "wall_s": round(wall, 3), "wall_s_all": [round(x, 3) for x in walls],
        "samples_per_s": round(len(samples) / wall, 3), "generated_tokens_per_s": round(sum(generated) / wall, 2),
        "peak_memory_gb": None if peak is None else round(peak, 3),
    }
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(result, out, indent=2)
        out.write("\n")
    os.replace(temporary, output)
    peak_text = "-" if peak is None else f"{peak:.2f}"
    print(f"{result['device']}, kvpress {result['kvpress']}, transformers {result['transformers']}; {result['note']}")
    print("| method | budget | samples | prompt_tok | new_tok | batch | wall_s | samples/s | tok/s | peak_GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| kvpress SnapKVPress | {budget} | {result['samples']} | {result['prompt_tokens']} | "
          f"{result['generated_tokens']} | 1 | {wall:.2f} | {result['samples_per_s']:.3f} | "
          f"{result['generated_tokens_per_s']:.1f} | {peak_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
