"""`evalkv pred compress=context` end to end on the tiny model, one run per task family, and questions about one
context (RULER's niah_multiquery with task.split_queries) compressed once per context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from ruler_helpers import multiquery_rows

from evalkv.cli import main
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.records import read_records
from evalkv.run import pred
from evalkv.tasks import build_task
from evalkv.tasks.ruler import Ruler
from evalkv.tasks.ruler.constants import TEMPLATES

TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false", "method=snapkv", "budget=32",
        "method.window_size=4"]
ESSAY = ("Some essay text. It goes on and on about startups. Then it ends. " * 40).strip()


def _pred(tmp_path: Path, capsys, *overrides: str) -> Path:
    assert main(["pred", *TINY, f"output_dir={tmp_path / 'results'}", *overrides]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def _loaded():
    """The model evalkv pred loaded in this process (cached for the next run)."""
    return next(iter(pred._loaded.values()))


def _essays(tmp_path: Path) -> str:
    (tmp_path / "essays").mkdir(exist_ok=True)
    (tmp_path / "essays" / "a.txt").write_text(ESSAY)
    return str(tmp_path / "essays")


@pytest.mark.parametrize("task,options", [
    ("passkey", {"lengths": [256], "depths": [0.0, 100.0]}),
    ("needle", {"lengths": [400], "depths": [50.0]}),
    ("ruler", {"tasks": ["niah_single_1"], "lengths": [1024], "num_samples": 2}),
])
def test_compress_context_runs_every_task_family(tmp_path, capsys, task, options):
    if task == "needle":
        options = {**options, "haystack_path": _essays(tmp_path)}
    if task == "ruler":
        options = {**options, "cache_dir": str(tmp_path / "cache")}
    overrides = [f"task.{key}={json.dumps(value).replace(' ', '')}" for key, value in options.items()]
    run = _pred(tmp_path, capsys, f"task={task}", "compress=context", *overrides)
    assert run.parent.parent.name.startswith(f"{task}-compress=context")
    records = read_records(run / "predictions.jsonl")
    whole = list(build_task(task, options).samples(_loaded()))  # compress=prompt: the same prompts, whole
    assert [r["id"] for r in records] == [s.id for s in whole]
    assert [r["prompt_tokens"] for r in records] == [len(s.prompt_ids) for s in whole]
    assert all(r["compress"] == "context" and not r["context_reused"] for r in records)
    assert all(r["kept_tokens"] > 32 for r in records)  # the question was appended to the compressed context
    labels = json.loads((run / "run.json").read_text())["labels"]
    assert labels["query"] == "agnostic"


def test_questions_about_one_context_are_compressed_once_and_answer_as_alone(tmp_path, capsys, monkeypatch):
    rows = multiquery_rows()
    monkeypatch.setattr(Ruler, "generated", lambda self, tokenizer, name=None: iter([("niah_multiquery", 1024, rows)]))
    monkeypatch.setitem(TEMPLATES["niah"], "tokens_to_generate", 6)  # RULER's 128 would only slow the test down
    options = ["task=ruler", "task.tasks=[niah_multiquery]", "task.lengths=[1024]", "task.num_samples=2",
               "task.split_queries=true", "compress=context", "batch_size=3"]
    run = _pred(tmp_path, capsys, *options)
    records = read_records(run / "predictions.jsonl")
    assert [r["id"] for r in records] == [f"niah_multiquery-1024-{i}-q{j}" for i in range(2) for j in range(4)]
    assert [r["context_reused"] for r in records] == [False, True, True, True] * 2
    assert max(r["decode_batch"] for r in records) <= 3  # a batch holds a whole context's questions, decodes 3 at most
    model = _loaded()
    task = build_task("ruler", {"tasks": ["niah_multiquery"], "lengths": [1024], "num_samples": 2,
                                "split_queries": True, "compress": "context"})
    engine = Engine(model.model, build_method("snapkv", {"budget": 32, "window_size": 4}), model.backend,
                    model.tokenizer)
    for sample, record in zip(task.samples(model), records):
        alone = engine.generate(sample.prompt_ids, sample.max_new_tokens, [*model.stop_token_ids,
                                                                           *sample.stop_token_ids],
                                suffix_ids=sample.suffix_ids)
        assert (record["pred"], record["new_tokens"]) == (model.decode(alone.token_ids), len(alone.token_ids))
        assert (record["prompt_tokens"], record["kept_tokens"]) == (alone.prompt_tokens,
                                                                    round(alone.kept_tokens, 3))
    assert main(["score", str(run)]) == 0
    scores = json.loads((run / "scores.json").read_text())
    assert scores["n"] == {"niah_multiquery": 8}


LEGACY_AGNOSTIC = (Path(__file__).parent / "data" / "legacy" / "runs" / "longbench-tasks=multi_news-query_agnostic=True"
                   / "random-tiny-llama" / "snapkv_64")


@pytest.mark.skipif(not (SHARED_DATA / "longbench" / "multi_news.jsonl").is_file(),
                    reason="LongBench's multi_news is not in ../shared/data")
def test_a_run_made_with_query_agnostic_resumes_as_compress_context(tmp_path, capsys):
    """A LongBench folder from before `compress` (task.query_agnostic: true) is the compress=context run it was."""
    shutil.copytree(LEGACY_AGNOSTIC, tmp_path / "run")
    command = ["pred", "model=random-tiny-llama", "progress=false", "method=snapkv", "budget=64", "task=longbench",
               "task.tasks=[multi_news]", "task.samples_per_task=2", f"task.data_dir={SHARED_DATA / 'longbench'}",
               "model.max_prompt_length=512", f"run_dir={tmp_path / 'run'}"]
    assert main([*command, "compress=context"]) == 0
    assert "already complete: reusing 2 records" in capsys.readouterr().err
