"""Synthetic workloads that `evalkv bench --workload NAME` times end to end: random prompt ids uniform in the model's
vocabulary, each sample generating exactly its max new tokens (EOS ignored). Every draw is seeded: the same arguments
give the same workload. Both workloads are one dict: `version`, `workload` (the name), the settings, and `samples`,
each `{"task", "prompt_ids", "max_new_tokens"}`, which `--write-workload` saves and scripts/kvpress_bench.py reads.

`longbench`, LongBench-shaped: for each of the 16 English tasks that `task=longbench` runs by default
(`spec.ENGLISH_TASKS`), `samples_per_task` prompt lengths in tokens are drawn from a log-normal distribution with
log-space standard deviation `SIGMA`, whose mean is the task's average length in LongBench's task.md
(`spec.AVERAGE_LENGTH`, in words) times `TOKENS_PER_WORD`, then clipped to [min_length, max_length]. The clip stands for
LongBench's pred.py, which cuts a prompt longer than the model's budget down to it (middle truncation; 31500 tokens for
its 32K-context models, `model2maxlen`). Each sample generates exactly its task's max new tokens
(`spec.MAX_NEW_TOKENS`, LongBench's dataset2maxlen).

TOKENS_PER_WORD was measured with the embedded model's tokenizer (Qwen2.5's 151K-entry byte-level BPE, of the same
family as Llama-3's 128K one) on MiniLongBench's rendered LongBench prompts (`../shared/data/minilongbench`): 1.44
tokens per whitespace word over the 138 prompts of the 14 English prose tasks (1,045,134 words), 2.66 over the 49
prompts of the code tasks lcc and repobench-p (code splits into more tokens per word).

SIGMA = 0.6 is the log-length standard deviation of the natural-text LongBench files at hand (`../shared/data`):
multi_news 0.62, multifieldqa_zh 0.56 (synthetic tasks are narrower: passage_retrieval_zh 0.12).

`reasoning`, short prompts and long generations (the shape of a reasoning model's chain of thought): `samples` prompt
lengths uniform in [min_length, max_length] (100 to 1000 tokens by default), each sample generating exactly
`max_new_tokens` tokens (8192 by default); its samples' task is "reasoning".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from evalkv.errors import EvalkvError
from evalkv.records import read_json, write_text_atomic
from evalkv.tasks.longbench.spec import AVERAGE_LENGTH, CATEGORIES, ENGLISH_TASKS, MAX_NEW_TOKENS, TASKS

WORKLOAD_VERSION = 1
WORKLOADS = ("longbench", "reasoning")
TOKENS_PER_WORD = {"prose": 1.44, "code": 2.66}
SIGMA = 0.6
DEFAULT_MIN_LENGTH = 256
DEFAULT_MAX_LENGTH = 31500  # LongBench's model2maxlen for 32K-context models
REASONING_SAMPLES = 64
REASONING_MIN_LENGTH = 100
REASONING_MAX_LENGTH = 1000
REASONING_NEW_TOKENS = 8192


def mean_tokens(task: str) -> float:
    """The task's average prompt length in tokens: task.md's average in words times the tokens-per-word factor."""
    kind = "code" if task in CATEGORIES["Code"] else "prose"
    return AVERAGE_LENGTH[task] * TOKENS_PER_WORD[kind]


def sample_lengths(task: str, count: int, seed: int, min_length: int = DEFAULT_MIN_LENGTH,
                   max_length: int = DEFAULT_MAX_LENGTH, sigma: float = SIGMA) -> list[int]:
    """`count` prompt lengths of `task`: log-normal with mean `mean_tokens(task)`, clipped to [min, max].

    Each task draws from its own stream, so its lengths do not depend on the other tasks, and a smaller `count`
    gives a prefix of a larger one.
    """
    mu = math.log(mean_tokens(task)) - sigma**2 / 2  # a log-normal's mean is exp(mu + sigma^2 / 2)
    draws = np.random.default_rng([seed, TASKS.index(task)]).lognormal(mu, sigma, count)
    return [int(min(max_length, max(min_length, round(float(x))))) for x in draws]


def build_workload(vocab_size: int, samples_per_task: int = 4, seed: int = 0, min_length: int = DEFAULT_MIN_LENGTH,
                   max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """The workload: samples grouped by task in LongBench's order, each `{"task", "prompt_ids", "max_new_tokens"}`."""
    if samples_per_task < 1:
        raise EvalkvError(f"samples per task must be at least 1, got {samples_per_task}")
    _check_draws(vocab_size, min_length, max_length)
    samples = []
    for task in ENGLISH_TASKS:
        lengths = sample_lengths(task, samples_per_task, seed, min_length, max_length)
        for index, length in enumerate(lengths):
            ids = np.random.default_rng([seed, TASKS.index(task), index + 1]).integers(0, vocab_size, length)
            samples.append({"task": task, "prompt_ids": ids.tolist(), "max_new_tokens": MAX_NEW_TOKENS[task]})
    return {
        "version": WORKLOAD_VERSION, "workload": "longbench", "seed": seed, "vocab_size": vocab_size,
        "samples_per_task": samples_per_task, "min_length": min_length, "max_length": max_length, "sigma": SIGMA,
        "tokens_per_word": TOKENS_PER_WORD,
        "source": "evalkv/run/workload.py: LongBench task.md average lengths x tokens per word, log-normal, "
                  "LongBench dataset2maxlen max new tokens, random ids",
        "samples": samples,
    }


def build_reasoning_workload(vocab_size: int, samples: int = REASONING_SAMPLES, new_tokens: int = REASONING_NEW_TOKENS,
                             seed: int = 0, min_length: int = REASONING_MIN_LENGTH,
                             max_length: int = REASONING_MAX_LENGTH) -> dict:
    """The reasoning-shaped workload: `samples` prompts of lengths uniform in [min_length, max_length], each
    generating `new_tokens` tokens. The lengths come from one stream (fewer samples give a prefix of more), each
    sample's ids from its own."""
    if samples < 1 or new_tokens < 1:
        raise EvalkvError(f"samples and new tokens must be at least 1, got {samples} and {new_tokens}")
    _check_draws(vocab_size, min_length, max_length)
    lengths = np.random.default_rng([seed, 0]).integers(min_length, max_length, samples, endpoint=True)
    drawn = [{"task": "reasoning", "max_new_tokens": new_tokens,
              "prompt_ids": np.random.default_rng([seed, 0, index + 1]).integers(0, vocab_size, length).tolist()}
             for index, length in enumerate(lengths)]
    return {
        "version": WORKLOAD_VERSION, "workload": "reasoning", "seed": seed, "vocab_size": vocab_size,
        "min_length": min_length, "max_length": max_length, "max_new_tokens": new_tokens,
        "source": "evalkv/run/workload.py: prompt lengths uniform in [min_length, max_length], max_new_tokens each, "
                  "random ids",
        "samples": drawn,
    }


def _check_draws(vocab_size: int, min_length: int, max_length: int) -> None:
    if not 1 <= min_length <= max_length:
        raise EvalkvError(f"lengths must satisfy 1 <= min_length <= max_length, got {min_length} and {max_length}")
    if vocab_size < 1:
        raise EvalkvError(f"vocab_size must be positive, got {vocab_size}")


def write_workload(path: Path, workload: dict) -> None:
    """One compact JSON file (prompt ids make it large), written atomically."""
    write_text_atomic(path, json.dumps(workload, separators=(",", ":")) + "\n")


def read_workload(path: Path) -> dict:
    if not path.exists():
        raise EvalkvError(f"workload file {path} does not exist (write one with evalkv bench --workload NAME "
                          "--write-workload PATH)")
    workload = read_json(path)
    if not isinstance(workload, dict) or workload.get("version") != WORKLOAD_VERSION:
        raise EvalkvError(f"{path}: not an evalkv workload of version {WORKLOAD_VERSION}")
    samples = workload.get("samples")
    if not samples or any(not {"task", "prompt_ids", "max_new_tokens"} <= set(sample) for sample in samples):
        raise EvalkvError(f"{path}: expected a non-empty 'samples' list of {{task, prompt_ids, max_new_tokens}}")
    return workload


def summary(workload: dict) -> dict:
    """What the workload holds, without its ids: totals and, per task, samples, mean prompt length, max new tokens."""
    tasks: dict[str, dict] = {}
    for sample in workload["samples"]:
        entry = tasks.setdefault(sample["task"], {"samples": 0, "prompt_tokens": 0,
                                                  "max_new_tokens": sample["max_new_tokens"]})
        entry["samples"] += 1
        entry["prompt_tokens"] += len(sample["prompt_ids"])
    for entry in tasks.values():
        entry["mean_prompt_tokens"] = round(entry.pop("prompt_tokens") / entry["samples"], 1)
    settings = {key: value for key, value in workload.items() if key not in ("samples", "model", "evalkv")}
    return {
        **settings, "samples": len(workload["samples"]),
        "prompt_tokens": sum(len(sample["prompt_ids"]) for sample in workload["samples"]),
        "new_tokens": sum(sample["max_new_tokens"] for sample in workload["samples"]), "tasks": tasks,
    }
