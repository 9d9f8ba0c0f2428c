#!/usr/bin/env python3
"""kvpress's pipeline on a workload of evalkv bench: the kvpress baseline of its end-to-end timings (issue 8).

Reads the workload that `evalkv bench --workload longbench --write-workload FILE` wrote (`--workload reasoning`
writes the same format: the prompt ids, each sample's max new tokens, the model's config, evalkv's SnapKV budget and
window, and its decoding cuts when it has `decode_interval`), builds the same architecture with random weights, runs
every sample through kvpress's `kv-press-text-generation` pipeline with `SnapKVPress` (or, `--press
decoding-snapkv`, `DecodingPress` over it: see the end), times the whole workload end to end and writes a JSON
result. It imports only torch, transformers,
tokenizers and kvpress (no evalkv), so it runs in kvpress's own environment; kvpress 0.5.5 requires transformers < 5.3:

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
  the model's construction is excluded, the pipeline's own tokenisation of the text is included. `--samples K` times
  the first K samples only (the result says how many, and the mean wall time per sample, so a long workload such as
  `--workload reasoning`'s 8192 new tokens per sample compares per sample); `--new-tokens N` makes every sample
  generate N tokens instead of its own (a quick check; recorded in the result).
- Cache sizes: the pipeline records each layer's cache length before the question and cuts the answer off again
  (`_remove_answer_from_cache`); the script reads both there, and checks on every sample that the compressed context
  and the cache after the last forward hold what the press's rule gives (`expected_cache`).

`--press decoding-snapkv`: evalkv's snapkv with `decode_interval` (docs/methods.md#regimes), whose options are
kvpress's `DecodingPress(base_press=SnapKVPress(window_size, kernel_size), compression_interval=decode_interval,
target_size=decode_target or budget, hidden_states_buffer_size=decode_buffer)`, all from the workload's evalkv snapkv
settings (or --decode-interval, --decode-target, --decode-buffer). What kvpress 0.5.5 does with it:
- The context (kvpress/pipeline.py, `KVPressTextGenerationPipeline._forward`): a `DecodingPress` is not a prefill
  press (`perform_prefill_compression` is false for it), so the context is prefilled whole with no hook; the press's
  hooks are registered only around the greedy loop, and `DecodingPress.__call__` resets its buffers on the way out.
  Its base press never sees the context. evalkv's snapkv compresses a prompt longer than the budget first, so such a
  context gets kvpress's own combination instead, `PrefillDecodingPress(prefilling_press=SnapKVPress(ratio as above),
  decoding_press=the DecodingPress)` (presses/prefill_decoding_press.py: prefill forwards go to the first, later ones
  to the second); the reasoning workload's prompts (100-1000 tokens) under budget 1024 never need it.
- The cuts (presses/decoding_press.py, `DecodingPress.forward_hook`): every forward after the context (in every
  layer; `is_prefilling` is false once the cache held tokens before it), the question's included, appends the
  layer's input hidden states to that layer's buffer and counts one step; at the `compression_interval`-th step
  `DecodingPress.compress` sets the base press's ratio so that `int(length * (1 - ratio)) == target_size` and
  `ScorerPress.compress` keeps the `target_size` best entries per KV head; a cache of at most `target_size` is left
  as it is (ratio 0), but the count restarts and the buffer is emptied all the same. Between cuts the buffer keeps the
  newest `hidden_states_buffer_size` forwards, so a cut sees min(interval, buffer + 1) of them.
- The scores (presses/snapkv_press.py, `SnapKVPress.score` / `compute_window_attention`): the buffer's last
  `window_size` hidden states are projected to queries again (`q_proj`) and rotated with the RoPE of the current
  forward's position (`position_embeddings` of a one-token forward, broadcast over the window), attend over the whole
  cache (causal inside its last `window_size` entries), averaged over the window, average-pooled and averaged over the
  GQA group; the last `window_size` entries score above all and are always kept. `score` asserts that the buffer
  holds more than `window_size` hidden states, so the script requires decode_interval > window_size and
  decode_buffer >= window_size (evalkv shrinks the window to the queries it has instead). With
  `--attn-implementation eager` SnapKVPress would read the current forward's attention weights (one query row)
  instead of the window's; keep sdpa.
- Against evalkv's snapkv with decode_interval (the same rule otherwise: cut to the target every interval forwards,
  the newest window_size queries voting, the window kept, grow by one entry per forward between cuts): kvpress feeds
  the prompt's last token as the question, one forward after the context, and counts it as step 1, where evalkv
  prefills the whole prompt and counts its decode forwards; so kvpress cuts when the sequence is one token shorter
  (prompt + K - 1, then every K) and runs one forward more per sample. kvpress rotates the window's queries at the
  current position (evalkv: at their own positions), and pools as its prompt press does (above).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import torch

PRESSES = ("snapkv", "decoding-snapkv")


class Call(NamedTuple):
    """One pipeline call: the context and question as text, and what it runs with."""

    context: str
    question: str
    context_length: int
    new_tokens: int
    ratio: float  # SnapKVPress's compression ratio on the context (0: the context fits the budget)


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


def expected_cache(context_length: int, new_tokens: int, budget: int, cuts: tuple[int, int] | None = None):
    """What kvpress's cache holds per layer and KV head for one sample: after the context, at every decoding cut
    (entries before, after) and after the last forward.

    The context keeps min(context length, budget); then the pipeline runs `new_tokens` forwards (the question, then
    every generated token but the last), each adding one entry; with `cuts = (interval, target)` every interval-th of
    them cuts a cache longer than `target` back to it (DecodingPress, see the module docstring)."""
    length = min(context_length, budget)
    after_context, cut_lengths = length, []
    for step in range(1, new_tokens + 1):
        length += 1
        if cuts is not None and step % cuts[0] == 0:
            cut_lengths.append((length, min(length, cuts[1])))
            length = min(length, cuts[1])
    return after_context, cut_lengths, length


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_result(output: Path, result: dict) -> None:
    """The result JSON, written atomically with the permissions `open` gives a new file (0666 less the umask;
    mkstemp would make it 0600), as evalkv's own writes are (evalkv/records.py; this script runs without evalkv)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as out:
        json.dump(result, out, indent=2)
        out.write("\n")
    os.replace(temporary, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", help="the workload JSON written by evalkv bench --write-workload")
    parser.add_argument("-o", "--output", required=True, help="the JSON result to write")
    parser.add_argument("--press", default="snapkv", choices=PRESSES, help="snapkv (default): SnapKVPress on the "
                        "context, as evalkv's snapkv; decoding-snapkv: DecodingPress over SnapKVPress, cutting the "
                        "cache while decoding, as evalkv's snapkv with decode_interval")
    parser.add_argument("--budget", type=int, help="entries kept per layer and KV head, window included "
                        "(default: evalkv's snapkv budget in the workload)")
    parser.add_argument("--window-size", type=int, help="SnapKV observation window (default: evalkv's snapkv)")
    parser.add_argument("--kernel-size", type=int, help="SnapKV pooling kernel (default: evalkv's snapkv)")
    parser.add_argument("--decode-interval", type=int, help="decoding-snapkv: forwards between cuts "
                        "(compression_interval; default: evalkv's snapkv decode_interval)")
    parser.add_argument("--decode-target", type=int, help="decoding-snapkv: entries per KV head after a cut "
                        "(target_size; default: evalkv's snapkv decode_target, else the budget)")
    parser.add_argument("--decode-buffer", type=int, help="decoding-snapkv: forwards buffered for a cut "
                        "(hidden_states_buffer_size; default: evalkv's snapkv decode_buffer, else 256 as both have)")
    parser.add_argument("--samples", type=int, help="time the first K samples of the workload (default: all)")
    parser.add_argument("--new-tokens", type=int, help="every sample generates this many tokens instead of its own "
                        "max new tokens (a quick check)")
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
    from kvpress import DecodingPress, PrefillDecodingPress, SnapKVPress

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
    cuts, buffer = None, None
    if options.press == "decoding-snapkv":
        interval = options.decode_interval or snapkv.get("decode_interval")
        target = options.decode_target or snapkv.get("decode_target") or budget
        buffer = options.decode_buffer if options.decode_buffer is not None else snapkv.get("decode_buffer", 256)
        if interval is None:
            sys.exit("--press decoding-snapkv needs evalkv's decode_interval: write the workload with "
                     "`method=snapkv snapkv.decode_interval=K`, or pass --decode-interval")
        if interval <= window_size or buffer < window_size or target < window_size:
            sys.exit(f"kvpress's SnapKVPress scores a decoding cut from more than window_size ({window_size}) buffered "
                     f"forwards and keeps the window: need decode_interval > {window_size}, decode_buffer >= "
                     f"{window_size} and decode_target >= {window_size}; got {interval}, {buffer}, {target}")
        cuts = (interval, target)
    samples = workload["samples"]
    if options.samples is not None and not 1 <= options.samples <= len(samples):
        sys.exit(f"--samples must be between 1 and the workload's {len(samples)} samples, got {options.samples}")
    timed = samples[:options.samples]
    if options.new_tokens is not None and options.new_tokens < 1:
        sys.exit(f"--new-tokens must be at least 1, got {options.new_tokens}")
    if min(len(sample["prompt_ids"]) for sample in timed) < 2:
        sys.exit("every prompt needs at least 2 tokens (a context and a question)")

    device = torch.device(options.device)
    model = build_model(workload["model"], getattr(torch, options.dtype), device, options.attn_implementation,
                        options.seed)
    tokenizer = pass_through_tokenizer(workload["model"]["config"]["vocab_size"])
    pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=device)

    # What the pipeline's last call held, per layer: the lengths it cuts the answer back to (the compressed context),
    # the cache after the last forward, and every decoding cut (entries before, after).
    held = {}
    remove_answer = pipe._remove_answer_from_cache

    def remove_answer_recording(cache, context_lengths):
        held["after_context"] = list(context_lengths)
        held["at_end"] = [cache.get_seq_length(layer) for layer in range(len(cache))]
        remove_answer(cache, context_lengths)

    pipe._remove_answer_from_cache = remove_answer_recording

    def recording_cuts(decoding: DecodingPress) -> DecodingPress:
        compress = decoding.compress

        def compress_recording(module, hidden_states, keys, values, attentions, kwargs):
            kept_keys, kept_values = compress(module, hidden_states, keys, values, attentions, kwargs)
            held["cuts"].setdefault(module.layer_idx, []).append((keys.shape[2], kept_keys.shape[2]))
            return kept_keys, kept_values

        decoding.compress = compress_recording
        return decoding

    def press_for(ratio: float):
        """The press of one call: SnapKVPress on the context, or DecodingPress (with SnapKVPress on a context longer
        than the budget first, as evalkv compresses it: PrefillDecodingPress)."""
        context_press = SnapKVPress(compression_ratio=ratio, window_size=window_size, kernel_size=kernel_size)
        if cuts is None:
            return context_press
        decoding = recording_cuts(DecodingPress(
            base_press=SnapKVPress(window_size=window_size, kernel_size=kernel_size), compression_interval=cuts[0],
            target_size=cuts[1], hidden_states_buffer_size=buffer))
        return decoding if ratio == 0 else PrefillDecodingPress(prefilling_press=context_press,
                                                                 decoding_press=decoding)

    def text_of(ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    calls = [Call(text_of(s["prompt_ids"][:-1]), text_of(s["prompt_ids"][-1:]), len(s["prompt_ids"]) - 1,
                  options.new_tokens or s["max_new_tokens"], compression_ratio(len(s["prompt_ids"]) - 1, budget))
             for s in timed]

    def run(call: Call, new_tokens: int | None = None) -> str:
        held.clear()
        held["cuts"] = {}
        return pipe(call.context, question=call.question, press=press_for(call.ratio),
                    max_new_tokens=new_tokens or call.new_tokens)["answer"]

    # The pipeline sees exactly the workload's ids: its own preprocessing of the first sample.
    preprocess_options, _, _ = pipe._sanitize_parameters(question=calls[0].question)
    inputs = pipe.preprocess(calls[0].context, **preprocess_options)
    seen = inputs["context_ids"][0].tolist() + inputs["questions_ids"][0][0].tolist()
    assert seen == timed[0]["prompt_ids"], "the pipeline's token ids differ from the workload's"

    run(calls[0], new_tokens=min(4, calls[0].new_tokens))  # warm-up
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    walls = []
    for _ in range(options.repeats):
        answers, caches = [], []
        synchronize(device)
        began = time.perf_counter()
        for call in calls:
            answers.append(run(call))
            caches.append({key: held[key] for key in ("after_context", "cuts", "at_end")})
        synchronize(device)
        walls.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    generated = [len(answer.split()) for answer in answers]
    short = [i for i, (count, call) in enumerate(zip(generated, calls)) if count != call.new_tokens]
    if short:
        sys.exit(f"samples {short[:5]} did not generate the new tokens asked for")
    for index, (call, cache) in enumerate(zip(calls, caches)):
        after_context, cut_lengths, at_end = expected_cache(call.context_length, call.new_tokens, budget, cuts)
        layers = len(cache["at_end"])
        expected = {"after_context": [after_context] * layers, "at_end": [at_end] * layers,
                    "cuts": {layer: cut_lengths for layer in range(layers)} if cut_lengths else {}}
        if cache != expected:
            sys.exit(f"sample {index} (context {call.context_length}, {call.new_tokens} new tokens): kvpress's cache "
                     f"held {cache['after_context']} entries after the context, {cache['at_end']} at the end, cuts "
                     f"(before, after) {str(cache['cuts'].get(0))[:200]} in layer 0; {options.press} at budget "
                     f"{budget}, cuts {cuts} gives {after_context}, {at_end}, {str(cut_lengths)[:200]}")
    per_sample = [{"context_tokens": call.context_length, "new_tokens": call.new_tokens,
                   "kept_after_context": cache["after_context"][0], "cache_at_end": cache["at_end"][0],
                   "cuts": sum(before > after for before, after in cache["cuts"].get(0, [])),
                   "largest_cache": max([cache["at_end"][0], *(before for before, _ in cache["cuts"].get(0, []))])}
                  for call, cache in zip(calls, caches)]

    wall = statistics.median(walls)
    if cuts is None:
        press = {"name": "SnapKVPress", "budget": budget, "window_size": window_size, "kernel_size": kernel_size,
                 "compression_ratio": "per sample: 1 - (budget + 0.5) / context length (0 when it fits)"}
    else:
        press = {"name": "DecodingPress(SnapKVPress)", "budget": budget, "window_size": window_size,
                 "kernel_size": kernel_size, "compression_interval": cuts[0], "target_size": cuts[1],
                 "hidden_states_buffer_size": buffer,
                 "contexts_compressed": sum(call.ratio > 0 for call in calls),
                 "context_compression": "a context longer than the budget: PrefillDecodingPress(SnapKVPress at 1 - "
                                        "(budget + 0.5) / context length, the DecodingPress); else DecodingPress alone"}
    press_label = press["name"]
    note = ("kvpress pipeline, one sample at a time; context = prompt[:-1] (compressed), question = prompt[-1]; "
            "EOS never stops generation (generation_config.eos_token_id = None): every sample generates its "
            f"{'max new tokens' if options.new_tokens is None else f'{options.new_tokens} new tokens (--new-tokens)'};"
            " wall time = every sample's pipeline call (tokenisation, prefill, compression, decode), model build "
            "excluded; median over repeats")
    if cuts is not None:
        note += (f"; DecodingPress cuts each layer to {cuts[1]} entries every {cuts[0]} forwards after the context "
                 "(the question's included)")
    if len(timed) < len(samples):
        note += f"; the first {len(timed)} of the workload's {len(samples)} samples"
    result = {
        "kvpress": version("kvpress"), "kvpress_path": str(Path(kvpress.__file__).parent),
        "transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": workload["model"]["name"], "num_parameters": workload["model"]["num_parameters"],
                  "dtype": options.dtype, "attn_implementation": options.attn_implementation, "seed": options.seed},
        "press": press, "note": note,
        "workload": {"file": str(options.workload), "seed": workload.get("seed"), "workload": workload.get("workload"),
                     "samples": len(samples)},
        "samples": len(timed), "new_tokens_override": options.new_tokens,
        "prompt_tokens": sum(len(s["prompt_ids"]) for s in timed),
        "generated_tokens": sum(generated),
        "kept_tokens": round(statistics.mean(sample["kept_after_context"] for sample in per_sample), 2),
        "cache_tokens_at_end": round(statistics.mean(sample["cache_at_end"] for sample in per_sample), 2),
        "largest_cache_tokens": max(sample["largest_cache"] for sample in per_sample),
        "wall_s": round(wall, 3), "wall_s_all": [round(x, 3) for x in walls],
        "wall_s_per_sample": round(wall / len(timed), 3),
        "samples_per_s": round(len(timed) / wall, 3), "generated_tokens_per_s": round(sum(generated) / wall, 2),
        "peak_memory_gb": None if peak is None else round(peak, 3),
        "per_sample": per_sample,
    }
    write_result(Path(options.output), result)
    peak_text = "-" if peak is None else f"{peak:.2f}"
    print(f"{result['device']}, kvpress {result['kvpress']}, transformers {result['transformers']}; {result['note']}")
    print("| method | budget | samples | prompt_tok | new_tok | batch | wall_s | s/sample | samples/s | tok/s | "
          "cache_end | peak_GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| kvpress {press_label} | {budget} | {result['samples']} | {result['prompt_tokens']} | "
          f"{result['generated_tokens']} | 1 | {wall:.2f} | {result['wall_s_per_sample']:.3f} | "
          f"{result['samples_per_s']:.3f} | {result['generated_tokens_per_s']:.1f} | "
          f"{result['cache_tokens_at_end']:g} | {peak_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
