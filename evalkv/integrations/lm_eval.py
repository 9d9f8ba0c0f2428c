"""evalkv as a model of lm-evaluation-harness: any lm-eval task through evalkv's engine with an eviction method.

    python -m evalkv.integrations.lm_eval --model evalkv \\
        --model_args model=qwen2.5-coder-0.5b-instruct,method=snapkv,budget=128 --tasks hellaswag

lm-eval 0.4.13 looks models up in its own registry and scans no entry points for them, so the model registers
under the name `evalkv` when this module is imported (into lm-eval's model registry, `lm_eval.api.registry`).
`python -m evalkv.integrations.lm_eval ARGS` imports it and runs
lm-eval's own command line with ARGS; in Python, `import evalkv.integrations.lm_eval` before
`lm_eval.simple_evaluate(model="evalkv", ...)`. evalkv also declares the `lm_eval.models` entry point that lm-eval's
plugin guide (its main branch, after 0.4.13) reads, so there `lm_eval --model evalkv` finds it without the import.
Install with `pip install 'evalkv[lm_eval]'`.

`--model_args` are evalkv's overrides (evalkv pred's dialect): `model=` (a model config, `evalkv list models`),
`model.X=`, `method=`, `method.X=`, `budget=`, `compression_ratio=`, `mlp_chunk=`, `decode_graphs=`; plus
`chunk_size=` (loglikelihood_rolling's chunks, default the method's `prefill_chunk`, else 512) and `max_gen_toks=`
(default 256). lm-eval's `--device` sets `model.device` unless given; `--batch_size` caps how many generations
decode together.

What each request type runs:
- `generate_until`: `Engine.generate_batch` on `tok_encode(context)` (the tokenizer's special tokens, as lm-eval's
  `hf` model; no truncation), the prompt compressed by the method, greedy decoding with its eviction; temperature 0
  only (`do_sample=true` or a temperature above 0 is refused). A stop string that is one token stops generation
  there; the text is then cut before the first stop string, as lm-eval's `hf` model cuts it.
- `loglikelihood`: evalkv/kv/scoring.py `score_continuations`: the context is compressed once, as a generation prompt,
  and each continuation's tokens are fed as decode steps, so `is_greedy` agrees with `generate_until`.
- `loglikelihood_rolling`: lm-eval's prefix token then `tok_encode(document)` (as the `hf` model, whose first window
  predicts every token after the prefix), scored with the chunked protocol through one cache. lm-eval's `hf` model
  scores windows of the model's length each from a fresh context; evalkv never does (a fresh cache per window would
  hide what eviction does), so with the full cache the two agree while a document fits one window.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm import tqdm

from evalkv.config import build_run, compose_run
from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine, Request
from evalkv.kv.protocol import CHUNKED, Protocol
from evalkv.kv.scoring import score_continuations, score_tokens
from evalkv.models.loader import load_model
from evalkv.overrides import Dialect

LM_EVAL = Dialect("lm_eval", ("model", "model.", "method", "method.", "budget", "compression_ratio", "mlp_chunk",
                              "decode_graphs"), "lm-eval chooses the tasks")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's `hf` model's default


def _override(key: str, value) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    return f"{key}={value}"


class EvalkvLM(TemplateLM):
    """An evalkv model, method and budget as an lm-eval `LM` (see the module docstring)."""

    def __init__(self, chunk_size: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, batch_size=1,
                 max_batch_size: int | None = None, device: str | None = None, **overrides):
        super().__init__()
        if device is not None and "model.device" not in overrides:
            overrides["model.device"] = device
        cfg = compose_run([_override(key, value) for key, value in overrides.items()], LM_EVAL)
        run = build_run(cfg)
        self.loaded = load_model(run.model)
        self.tokenizer = self.loaded.tokenizer
        self.engine = Engine(self.loaded.model, run.method, self.loaded.backend, self.tokenizer,
                             mlp_chunk=cfg.mlp_chunk, decode_graphs=cfg.decode_graphs)
        self.rolling = Protocol(CHUNKED, chunk_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_batch = int(batch_size) if str(batch_size).isdigit() else max_batch_size
        self._device = self.loaded.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling document start from: BOS, else EOS (lm-eval's `hf` model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids with its special tokens unless told otherwise or the text starts with BOS (lm-eval's
        `hf` model)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Continuations of one context are scored after one compression of it."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, _) in enumerate(requests):
            by_context.setdefault(tuple(context), []).append(index)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="evalkv loglikelihood") as bar:
            for context, members in by_context.items():
                scored = [index for index in members if requests[index][2]]
                for index in set(members) - set(scored):  # an empty continuation: log 1, trivially greedy
                    results[index] = (0.0, True)
                outcomes = score_continuations(self.engine, list(context), [requests[i][2] for i in scored]) \
                    if scored else []
                for index, scores in zip(scored, outcomes):
                    results[index] = (float(scores.logprobs.double().sum()), bool(scores.greedy.all()))
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
                bar.update(len(members))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="evalkv loglikelihood_rolling"):
            (document,) = request.args
            tokens = self.tok_encode(document)
            if not tokens:
                results.append(0.0)
                continue
            chunk = self.rolling.chunk(self.engine.method)
            scores = score_tokens(self.engine, [self.prefix_token_id, *tokens], chunk_size=chunk)
            results.append(float(scores.logprobs.double().sum()))
            self.cache_hook.add_partial("loglikelihood_rolling", (document,), results[-1])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings generate together."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="evalkv generate_until") as bar:
            for members in groups.values():
                until, max_new_tokens = self._generation_settings(requests[members[0]].args[1])
                stops = [*self.loaded.stop_token_ids, *self._stop_tokens(until)]
                batch = [Request(self.tok_encode(requests[index].args[0]), max_new_tokens, stop_token_ids=stops)
                         for index in members]
                generations = self.engine.generate_batch(batch, self.max_batch, on_finished=lambda _: bar.update(1))
                for index, generation in zip(members, generations):
                    results[index] = cut_at_stops(self.loaded.decode(generation.token_ids), until)
                    self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
        return results

    def _generation_settings(self, settings: dict) -> tuple[list[str], int]:
        """(stop strings, max new tokens) of a request's generation kwargs; anything but greedy is refused."""
        settings = dict(settings or {})
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        limits = [settings.pop(key, None) for key in ("max_gen_toks", "max_new_tokens", "max_tokens")]
        max_new_tokens = int(next((limit for limit in limits if limit is not None), self.max_gen_toks))
        sampling, temperature = settings.pop("do_sample", None), float(settings.pop("temperature", 0.0) or 0.0)
        if sampling or (sampling is None and temperature > 0):
            raise EvalkvError(
                f"evalkv decodes greedily, so it cannot sample (gen_kwargs do_sample={sampling}, temperature="
                f"{temperature}); run the task with temperature=0 or do_sample=false (--gen_kwargs temperature=0)")
        return until, max_new_tokens

    def _stop_tokens(self, until: Sequence[str]) -> list[int]:
        """The stop strings that are one token of this tokenizer, as stop tokens (the rest are cut afterwards)."""
        tokens = []
        for text in until:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1 and self.tokenizer.decode(ids) == text:
                tokens.append(ids[0])
        return tokens


# Registered by import path rather than by the class object: `python -m evalkv.integrations.lm_eval` runs this file as
# `__main__`, and lm-eval then imports the model under its importable name when first asked for it.
if "evalkv" not in model_registry:  # lm-eval's entry-point discovery may have registered the same path
    model_registry.register("evalkv", target="evalkv.integrations.lm_eval:EvalkvLM")


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` before the first stop string (lm-eval's post-processing of a generation)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `evalkv` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
