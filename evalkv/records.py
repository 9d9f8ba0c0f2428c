"""The one place that reads and writes run files: per-sample JSONL records (appended and flushed one by one, so a
killed run resumes) and whole-file JSON/YAML outputs (written to a temporary file, then renamed)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from evalkv.errors import EvalkvError

PREDICTIONS = "predictions.jsonl"
CONFIG = "config.yaml"
RUN_INFO = "run.json"
SCORES = "scores.json"
NO_BUDGET = "-"  # run.json's budget label of a method that keeps no budget (the full cache)


def compress_of(config: dict) -> str:
    """Which part of each prompt a run's config.yaml (as plain data) had compressed: `prompt` or `context`. Configs
    written before `compress` existed compressed the whole prompt, except LongBench's `task.query_agnostic: true`."""
    task = config.get("task") or {}
    return str(task.get("compress") or ("context" if task.get("query_agnostic") else "prompt"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader never sees half a file.
    The file gets the permissions `open` would give it (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL with mode 0666: the umask applies as for any new file (mkstemp would make every run file 0600)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def record_line(record: dict) -> str:
    """A record as its JSONL line (the one serialisation of records, appended or rewritten)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_records_atomic(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file by these records in one atomic write (merging data-parallel shards)."""
    write_text_atomic(path, "".join(record_line(record) for record in records))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalkvError(f"{path}: not valid JSON ({error})") from None


def read_records(path: Path) -> list[dict]:
    """Every record of a JSONL file. A corrupt line is an error naming its line number; a last line without its
    newline is a write cut short by a kill and is ignored (`drop_torn_tail` removes it before appending)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = number == len(lines) and not line.endswith("\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if torn:
                break
            raise EvalkvError(
                f"{path}:{number}: corrupt record ({error.msg}); repair or delete that line and run again"
            ) from None
        if not isinstance(record, dict):
            raise EvalkvError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def drop_torn_tail(path: Path) -> bool:
    """Cut a last line that lacks its newline (a write interrupted by a kill). Returns whether one was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return False
        handle.truncate(data.rfind(b"\n") + 1)
    return True


class RecordWriter:
    """Appends one JSON line per record and forces it to disk before returning."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(record_line(record))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
