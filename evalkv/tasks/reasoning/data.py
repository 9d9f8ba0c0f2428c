"""The problems of a reasoning task: a hub dataset through `datasets` at a resolved commit, or a local JSON-lines or
Parquet file, with the provenance every record carries (dataset id and revision)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.models.embedded import sha256_of

_COMMIT = re.compile(r"[0-9a-f]{40}")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubDataset:
    """Where a task's problems live on the Hugging Face hub."""

    repo: str
    split: str
    config: str | None = None

    def export_hint(self, file: str) -> str:
        """The one-liner that writes this split to a local file where the hub is reachable."""
        config = f"{self.config!r}, " if self.config else ""
        return (f"python -c \"from datasets import load_dataset; load_dataset({self.repo!r}, {config}"
                f"split={self.split!r}).to_json({file!r})\"")


@dataclass(frozen=True)
class Problems:
    rows: list[dict]
    dataset: str  # the hub repo id, or the local file's name
    revision: str  # the hub commit, or `sha256:<hex>` of the local file


def load_problems(source: HubDataset, data_path: str | None, revision: str | None) -> Problems:
    """The rows of `data_path` when given (JSON lines or Parquet, the hub dataset's columns), else of the hub
    dataset at `revision` (a branch, tag or commit; default the latest commit), resolved to its commit first."""
    if data_path:
        return _local(Path(data_path).expanduser(), source)
    return _hub(source, revision)


def _local(path: Path, source: HubDataset) -> Problems:
    if not path.is_file():
        raise EvalkvError(f"task.data_path {str(path)!r} is not a file (expected a .jsonl or .parquet file of "
                          f"{source.repo}'s {source.split} split)")
    if path.suffix not in LOCAL_SUFFIXES:
        raise EvalkvError(f"task.data_path {str(path)!r}: expected a file ending in {', '.join(LOCAL_SUFFIXES)}")
    if path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow's errors for a damaged file have no common base
            raise EvalkvError(f"{path}: not a readable Parquet file ({error})") from None
    else:
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EvalkvError(f"{path}:{number}: not a JSON line ({error.msg}); task.data_path takes one JSON "
                                  "object per line (datasets' to_json writes that) or a Parquet file") from None
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise EvalkvError(f"{path}: expected one JSON object per problem, found {len(rows)} rows")
    return Problems(rows, path.name, f"sha256:{sha256_of(path)}")


def _hub(source: HubDataset, revision: str | None) -> Problems:
    try:
        import datasets
        from huggingface_hub import HfApi
    except ImportError as error:
        raise EvalkvError(f"loading {source.repo} from the hub needs the datasets package ({error}); "
                          "pip install datasets, or give a local file: task.data_path=FILE.jsonl") from None
    try:
        commit = revision if revision and _COMMIT.fullmatch(revision) else HfApi().dataset_info(
            source.repo, revision=revision).sha
        rows = datasets.load_dataset(source.repo, source.config, split=source.split, revision=commit).to_list()
    except Exception as error:  # offline, unknown repo, gated, renamed: every hub failure ends in the same advice
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise EvalkvError(
            f"could not load {source.repo} ({source.split} split) from the Hugging Face hub "
            f"({type(error).__name__}: {first_line}). Without the hub, give a local copy as task.data_path=FILE "
            f"(.jsonl or .parquet with the dataset's columns); where the hub is reachable, write one with "
            f"{source.export_hint(Path(source.repo).name + '.jsonl')}"
        ) from None
    return Problems(rows, source.repo, commit)


def field(row: dict, names: tuple[str, ...], where: str):
    """The first of `names` that `row` has (datasets of the same problems spell their columns differently)."""
    for name in names:
        if name in row:
            return row[name]
    raise EvalkvError(f"{where}: no {' or '.join(map(repr, names))} column (columns: {', '.join(sorted(row))})")
