"""Perplexity under eviction: WikiText-2, PG-19 books or any text, scored token by token through the method's cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evalkv.errors import EvalkvError
from evalkv.kv.protocol import STREAM, Protocol
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.registry import register_task

DATASETS = ("wikitext", "pg19", "text")
# Record task names (the table's columns): one per source, so WikiText-2 and PG-19 runs share a table.
TASK_NAMES = {"wikitext": "wikitext2", "pg19": "pg19", "text": "text"}
# The hub's datasets (id, config): WikiText-2 raw as both references load it (`wikitext`, now `Salesforce/wikitext`
# on the hub), PG-19's test split as LaCache's ppl/run.py loads it (the 100 test books of deepmind/pg19).
HUB = {"wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1"), "pg19": ("emozilla/pg19-test", None)}
TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


@register_task("perplexity")
@dataclass
class Perplexity(Task):
    """Perplexity of a text fed through the method's compressed cache (WikiText-2, PG-19 books or a text file).

    Follows StreamingLLM's `examples/eval_long_ppl.py` (mit-han-lab/streaming-llm@2e50426) and LaCache's `ppl/run.py`
    (GATECH-EIC/LaCache@0f27c33): each text is tokenized as `tokenizer(text)` does (the tokenizer's BOS included),
    cut to `num_eval_tokens + 1` tokens, and every token but the first is scored (its NLL from the logits of the
    forward that fed its predecessor); PPL = exp(mean NLL over every scored token of every text). `protocol=stream`
    feeds one token per forward with eviction after each (the references'); `protocol=chunked` feeds `chunk_size`
    tokens per forward with the method's prompt compression after each chunk (evalkv/kv/scoring.py explains what
    each scored token attends to). One record per text, holding every scored token's NLL; `evalkv score` adds
    PPL and the mean NLL per position bucket of `bucket_size` tokens (evalkv/metrics/perplexity.py).

    Deviations: StreamingLLM keeps one cache across its texts (only `num_samples=1` is used in practice); evalkv
    scores each text from an empty cache. LaCache's loop scores `num_eval_tokens + 1` tokens; evalkv scores
    `num_eval_tokens`, as StreamingLLM. The log-softmax is in fp32 (the references' loss runs in the model's fp16).
    LaCache joins PG-19's first two books into one text; evalkv scores each book alone (the same tokens while
    `num_eval_tokens` is below the first book's length, about 60K tokens or more).

    dataset: `wikitext` (WikiText-2 raw, test split, its rows joined into one text as LaCache does), `pg19` (the
        first `books` books of PG-19's test split, one text each), or `text` (`text_path`).
    text_path: with dataset=text: a .txt file, a .json file with a `text` field (e.g. RULER's PaulGrahamEssays.json),
        a .jsonl file (one text per row's `text`), or a folder of .txt files (one text each, by name).
    dataset_path: a hub dataset id or a local folder of data files with a `text` column (default: Salesforce/wikitext
        with config wikitext-2-raw-v1, or emozilla/pg19-test); dataset_config: its config name; split: its split.
    books: PG-19 books scored (in the split's order).
    num_eval_tokens: tokens scored per text (null: the whole text).
    protocol: `stream` or `chunked`; chunk_size: tokens per forward with chunked (default: the method's
        `prefill_chunk`, else 512).
    bucket_size: tokens per position bucket of the NLL breakdown.
    """

    dataset: str = "wikitext"
    text_path: Optional[str] = None
    dataset_path: Optional[str] = None
    dataset_config: Optional[str] = None
    split: str = "test"
    books: int = 1
    num_eval_tokens: Optional[int] = 4096
    protocol: str = STREAM
    chunk_size: Optional[int] = None
    bucket_size: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dataset not in DATASETS:
            raise EvalkvError(f"perplexity: unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if (self.dataset == "text") != (self.text_path is not None):
            raise EvalkvError("perplexity: dataset=text reads task.text_path=FILE, and text_path needs dataset=text "
                              f"(got dataset={self.dataset}, text_path={self.text_path})")
        Protocol(self.protocol, self.chunk_size)  # refuses an unknown protocol, a chunk size without chunks
        if self.books < 1 or self.bucket_size < 1 or (self.num_eval_tokens is not None and self.num_eval_tokens < 1):
            raise EvalkvError(f"perplexity: books, bucket_size and num_eval_tokens must be >= 1, got {self.books}, "
                              f"{self.bucket_size}, {self.num_eval_tokens}")

    @property
    def task_names(self) -> list[str]:
        return [TASK_NAMES[self.dataset]]

    def samples(self, model) -> Iterator[Sample]:
        protocol = Protocol(self.protocol, self.chunk_size)
        for identifier, text, metadata in self._texts():
            ids = self._tokens(model, text)
            if len(ids) < 2:
                raise EvalkvError(f"perplexity: text {identifier!r} has {len(ids)} token(s); scoring needs two or more")
            yield Sample(
                id=identifier, task=TASK_NAMES[self.dataset], prompt_ids=ids, answers=[], max_new_tokens=0,
                length=len(ids), scoring=protocol,
                metadata={"dataset": self.dataset, "protocol": self.protocol, "bucket_size": self.bucket_size,
                          **metadata},
            )

    def size(self) -> int | None:
        if self.dataset == "wikitext":
            return 1
        return self.books if self.dataset == "pg19" else None

    def _tokens(self, model, text: str) -> list[int]:
        """`tokenizer(text)`'s first `num_eval_tokens + 1` ids, tokenizing a growing prefix of a long text (BPE never
        merges across the whitespace it splits at, so all but the prefix's last few tokens are the whole text's)."""
        if self.num_eval_tokens is None:
            return model.encode_prompt(text)
        needed, characters = self.num_eval_tokens + 1, 8 * (self.num_eval_tokens + 64)
        while True:
            ids = model.encode_prompt(text[:characters])
            if characters >= len(text) or len(ids) >= needed + 64:
                return ids[:needed]
            characters *= 2

    def _texts(self) -> Iterator[tuple[str, str, dict]]:
        """(id, text, record metadata) of every text, in order."""
        if self.dataset == "text":
            yield from _file_texts(Path(self.text_path))
            return
        rows = _hub_rows(self.dataset, self.dataset_path, self.dataset_config, self.split)
        if self.dataset == "wikitext":
            yield "wikitext2", "".join(row["text"] for row in rows), {}
            return
        for index, row in enumerate(rows):
            if index == self.books:
                return
            yield f"pg19_{index}", row["text"], {"title": row.get("short_book_title")}


def _file_texts(path: Path) -> Iterator[tuple[str, str, dict]]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise EvalkvError(f"perplexity: the folder {path} holds no .txt file")
        for file in files:
            yield file.stem, file.read_text(encoding="utf-8"), {"source": file.name}
        return
    if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
        raise EvalkvError(f"perplexity: text_path {path} is not a {', '.join(TEXT_SUFFIXES)} file or a folder of .txt "
                          "files")
    if path.suffix == ".txt":
        yield path.stem, path.read_text(encoding="utf-8"), {"source": path.name}
        return
    lines = path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl" else [path.read_text("utf-8")]
    for number, line in enumerate(line for line in lines if line.strip()):
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise EvalkvError(f"perplexity: {path} (row {number + 1}) has no string `text` field")
        yield (path.stem if path.suffix == ".json" else f"{path.stem}_{number}"), row["text"], {"source": path.name}


def _hub_rows(dataset: str, path: str | None, config: str | None, split: str):
    """The split's rows through `datasets` (a hub id, or a local folder of data files)."""
    try:
        import datasets
    except ImportError:
        raise EvalkvError(f"perplexity: dataset={dataset} is read with the `datasets` package: pip install datasets "
                          "(or evalkv[perplexity]), or give the text as dataset=text task.text_path=FILE") from None
    if path is None:
        path, config = HUB[dataset][0], config or HUB[dataset][1]
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as error:  # offline hubs, missing files and bad names all land here: say what to try
        raise EvalkvError(
            f"perplexity: cannot load {path}{f' ({config})' if config else ''}, split {split}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. Where the hub is unreachable, "
            "download it elsewhere and pass task.dataset_path=<folder of its data files>, or give the text itself "
            "with dataset=text task.text_path=FILE") from None
