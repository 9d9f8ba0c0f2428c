"""task=ruler: samples from the model's tokenizer, the on-disk cache (byte-identical regeneration), bad input, and an
end-to-end `evalkv pred` + `evalkv score` whose scores equal RULER's formulas on the records."""

from __future__ import annotations

import json

import nltk
import pytest
from conftest import tiny_loaded
from ruler_helpers import ESSAYS, needs_essays
from test_ruler_generators import hotpot_fixture, squad_fixture

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.metrics.ruler import match_all, postprocess_pred
from evalkv.records import read_records
from evalkv.tasks import build_task
from evalkv.tasks.ruler import niah
from evalkv.tasks.ruler.sentences import punkt_identity


def _task(tmp_path, **options):
    return build_task("ruler", {"lengths": [1024], "num_samples": 2, "cache_dir": str(tmp_path / "cache"),
                                **options})


def test_samples_are_the_cached_rows_tokenized_for_the_model(tmp_path):
    model = tiny_loaded()
    task = _task(tmp_path, tasks=["niah_single_1", "fwe"])
    samples = list(task.samples(model))
    assert [s.id for s in samples] == ["niah_single_1-1024-0", "niah_single_1-1024-1", "fwe-1024-0", "fwe-1024-1"]
    assert task.size() == 4
    rows = [json.loads(line) for path in sorted((tmp_path / "cache").rglob("*.jsonl"), key=lambda p: p.parent.name,
                                                reverse=True) for line in path.read_text().splitlines()]
    for sample, row in zip(samples, rows):
        assert model.tokenizer.decode(sample.prompt_ids) == row["input"] + row["answer_prefix"]
        assert row["input"].startswith("<|user|>\n") and row["input"].endswith("<|end|>\n<|assistant|>\n")
        assert sample.length == len(sample.prompt_ids) <= 1024 - sample.max_new_tokens
        assert sample.answers == row["outputs"] and sample.metadata["context_length"] == 1024
        assert sample.metadata["ruler_length"] == row["length"] == len(sample.prompt_ids) + sample.max_new_tokens
    assert [s.max_new_tokens for s in samples] == [128, 128, 50, 50]


def test_without_chat_template_the_prompt_is_ruler_base_template(tmp_path):
    model = tiny_loaded()
    sample = next(iter(_task(tmp_path, tasks=["niah_single_1"], chat_template=False).samples(model)))
    text = model.tokenizer.decode(sample.prompt_ids)
    assert text.startswith("A special magic number is hidden within the following text.")
    assert sample.prompt_ids == model.encode_prompt(text)  # the tokenizer's own special tokens, as fed unwrapped


def test_regeneration_is_byte_identical_and_the_cache_is_reused(tmp_path, monkeypatch):
    model = tiny_loaded()
    list(_task(tmp_path, tasks=["niah_multikey_2"]).samples(model))
    (path,) = (tmp_path / "cache").rglob("*.jsonl")
    first = path.read_bytes()
    path.unlink()
    list(_task(tmp_path, tasks=["niah_multikey_2"]).samples(model))
    assert path.read_bytes() == first

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the cache holds this key")

    monkeypatch.setattr(niah, "generate", fail)
    assert [s.answers for s in _task(tmp_path, tasks=["niah_multikey_2"]).samples(model)]
    key = json.loads(path.with_suffix(".key.json").read_text())
    assert key["num_samples"] == 2 and key["seed"] == 42 and len(key["tokenizer"]) == 64


def test_a_different_seed_or_sample_count_is_another_cache_entry(tmp_path):
    model = tiny_loaded()
    base = [s.answers for s in _task(tmp_path, tasks=["niah_single_1"]).samples(model)]
    seeded = [s.answers for s in _task(tmp_path, tasks=["niah_single_1"], seed=7).samples(model)]
    more = [s.answers for s in _task(tmp_path, tasks=["niah_single_1"], num_samples=3).samples(model)]
    assert seeded != base and more[:2] == base  # RULER's samples are drawn in sequence
    assert len(list((tmp_path / "cache").rglob("*.jsonl"))) == 3


@needs_essays
def test_essay_task_reads_the_essays(tmp_path):
    model = tiny_loaded()
    task = _task(tmp_path, tasks=["niah_single_2"], lengths=[4096], essay_path=str(ESSAYS))
    samples = list(task.samples(model))
    assert all(s.length <= 4096 - 128 for s in samples)
    key = json.loads(next((tmp_path / "cache").rglob("*.key.json")).read_text())
    assert key["data"]["essays"] == "c991a4f897d482a4c845028f5bd3aa8951569b1ab1708723bcc6ec72e66b9446"
    sentences = key["data"]["sentences"]  # the splitter is part of the cache key: no stale rule-split haystacks
    assert sentences == punkt_identity() and sentences["splitter"] == "nltk.sent_tokenize"
    assert sentences["nltk"] == nltk.__version__ and len(sentences["punkt_tab"]) == 64


def test_qa_tasks_read_the_given_files(tmp_path):
    squad, hotpot = tmp_path / "squad.json", tmp_path / "hotpot.json"
    squad.write_text(json.dumps(squad_fixture()))
    hotpot.write_text(json.dumps(hotpot_fixture()))
    task = _task(tmp_path, tasks=["qa_1", "qa_2"], lengths=[2048], squad_path=str(squad), hotpotqa_path=str(hotpot))
    samples = list(task.samples(tiny_loaded()))
    assert [s.answers for s in samples] == [["Zeta", "river Zeta"], ["300 metres"], ["Ada"], ["Oslo"]]
    assert all(s.max_new_tokens == 32 for s in samples)


@pytest.mark.parametrize("options,message", [
    ({"tasks": ["niah_single_9"]}, "unknown RULER task 'niah_single_9'; known: niah_single_1, niah_single_2"),
    ({"tasks": []}, "unknown RULER task"),
    ({"lengths": [100]}, "lengths must be token counts >= 256"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_task("ruler", options)


@pytest.mark.parametrize("options,message", [
    ({"tasks": ["niah_single_2"]}, "set task.essay_path"),
    ({"tasks": ["niah_single_2"], "essay_path": "/no/such/essays.json"}, "not found"),
    ({"tasks": ["qa_1"]}, "set task.squad_path"),
    ({"tasks": ["qa_2"], "hotpotqa_path": "/no/such.json"}, "not found"),
    ({"tasks": ["cwe"], "cwe_words_path": "/no/such.json"}, "not found"),
])
def test_missing_data_is_an_error_before_anything_is_generated(tmp_path, options, message):
    with pytest.raises(EvalkvError, match=message):
        next(iter(_task(tmp_path, **options).samples(tiny_loaded())))
    assert not (tmp_path / "cache").exists()


@needs_essays
def test_missing_punkt_is_an_error_that_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    with pytest.raises(EvalkvError, match=r"nltk\.download\('punkt_tab'\).*NLTK_DATA") as error:
        next(iter(_task(tmp_path, tasks=["niah_single_1", "niah_single_2"], essay_path=str(ESSAYS))
                  .samples(tiny_loaded())))
    assert "evalkv data ruler" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()  # not even the essay-free task was generated


def test_a_malformed_qa_file_is_an_error(tmp_path):
    bad = tmp_path / "squad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
    with pytest.raises(EvalkvError, match="not the SQuAD v2 dev"):
        next(iter(_task(tmp_path, tasks=["qa_1"], squad_path=str(bad)).samples(tiny_loaded())))


def test_pred_and_score_end_to_end(tmp_path, capsys):
    overrides = ["pred", "model=random-tiny-llama", "model.device=cpu", "progress=false", "task=ruler",
                 "task.tasks=[fwe]", "task.lengths=[1024,1280]", "task.num_samples=1",
                 f"task.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'results'}"]
    assert main(overrides) == 0
    run = next((tmp_path / "results").rglob("predictions.jsonl")).parent
    records = read_records(run / "predictions.jsonl")
    assert len(records) == 2 and {r["task"] for r in records} == {"fwe"}
    assert all(r["id"] == f"{r['task']}-{r['context_length']}-{r['id'][-1]}" for r in records)
    capsys.readouterr()
    assert main(["score", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "string_match_all" in printed and "ruler (1 task): average " in printed and "1024 " in printed
    scores = json.loads((run / "scores.json").read_text())
    for task in ("fwe",):
        rows = [r for r in records if r["task"] == task]
        expected = round(sum(match_all(postprocess_pred(r["pred"]), r["answers"]) for r in rows) / len(rows) * 100, 2)
        assert scores["task_scores"][task] == expected
        assert set(scores["breakdown"][task]["by_context_length"]) == {"1024", "1280"}
    suite = scores["groups"]["ruler"]
    assert suite["tasks"] == ["fwe"] and suite["by_context_length"] == scores["breakdown"]["fwe"]["by_context_length"]
