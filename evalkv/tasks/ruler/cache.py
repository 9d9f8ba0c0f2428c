"""Generated RULER data on disk: one JSONL file per (task, length), keyed by everything that shapes its bytes.

The key covers the task and its RULER arguments, the target length, the number of samples, the seed, the generator
version, the tokenizer (its full serialisation), the chat wrapper and the sha256 of every data file read; the same
key gives the same file byte for byte, so a file is reused only where regenerating would rebuild it exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evalkv.errors import EvalkvError
from evalkv.records import read_records, write_json_atomic, write_text_atomic

# Bump when any generator's output changes for the same inputs: old files then stop matching.
GENERATOR_VERSION = 2  # 2: rows carry `question` (and niah_multiquery's single queries)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's class, name and complete definition (fast tokenizers' JSON, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    identity = f"{type(tokenizer).__name__}\0{getattr(tokenizer, 'name_or_path', '')}\0{definition}"
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


def cache_key(fields: dict[str, Any]) -> str:
    fields = {"generator_version": GENERATOR_VERSION, **fields}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def cached_rows(folder: Path, task: str, length: int, fields: dict[str, Any], count: int,
                generate: Callable[[], list[dict]]) -> list[dict]:
    """The rows stored under this key, else `generate()`'s rows, written atomically (JSONL + a key sidecar)."""
    key = cache_key({"task": task, "length": length, **fields})
    path = folder / task / f"{length}-{key[:20]}.jsonl"
    if path.is_file():
        try:
            rows = read_records(path)
        except EvalkvError:  # damaged: rebuild it
            rows = []
        if len(rows) == count:
            return rows
    rows = generate()
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_json_atomic(path.with_suffix(".key.json"), {"key": key, "task": task, "length": length, **fields})
    return rows
