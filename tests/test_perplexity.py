"""Perplexity under eviction (evalkv/kv/scoring.py, task=perplexity, evalkv/metrics/perplexity.py): every scored token
attends to the method's compressed cache, the full cache is transformers' own perplexity, and records aggregate into
PPL and NLL per position."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, prompt_ids, tiny_loaded, tiny_model

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.kv.protocol import Protocol
from evalkv.kv.scoring import score_continuations, score_tokens
from evalkv.methods import build_method
from evalkv.metrics import score_records
from evalkv.tasks import build_task

SINKS = 4  # streaming_llm's n_sink


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> list[int]:
    return prompt_ids(tokenizer, repeats=3)[:72]


def _engine(name: str, **options) -> Engine:
    return Engine(tiny_model("tiny-llama"), build_method(name, options))


def _transformers_logprobs(ids: list[int], allowed: torch.Tensor | None = None) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain transformers forward (eager attention, no evalkv cache),
    each query row seeing only the keys `allowed[row]` permits (default: the causal mask)."""
    model = tiny_model("tiny-llama")
    model.set_attn_implementation("eager")
    length = len(ids)
    rows, keys = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = keys <= rows if allowed is None else allowed & (keys <= rows)
    mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, float("-inf"))
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), attention_mask=mask).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("protocol", [Protocol("stream"), Protocol("chunked", 16)], ids=["stream", "chunked"])
def test_full_cache_is_transformers_perplexity(protocol, text_ids):
    scores = protocol.score(_engine("full"), text_ids)
    expected = _transformers_logprobs(text_ids)
    torch.testing.assert_close(scores.logprobs, expected, atol=1e-4, rtol=0)
    assert scores.start == 1 and len(scores.nll()) == len(text_ids) - 1
    assert math.isclose(math.exp(sum(scores.nll()) / len(scores.nll())), math.exp(-expected.mean().item()),
                        rel_tol=1e-4)


@pytest.mark.parametrize("name, options, protocol", [
    ("streaming_llm", {"budget": 72}, Protocol("stream")),
    ("h2o", {"budget": 80}, Protocol("stream")),
    ("snapkv", {"budget": 72}, Protocol("chunked", 16)),
])
def test_budget_covering_the_text_equals_full_exactly(name, options, protocol, text_ids):
    full = protocol.score(_engine("full"), text_ids)
    covered = protocol.score(_engine(name, **options), text_ids)
    assert torch.equal(covered.logprobs, full.logprobs)


def test_streaming_llm_stream_is_the_masked_reference_and_differs_from_full(text_ids):
    """Token by token at budget 8: token t attends to the 4 sinks, the 4 newest earlier tokens and itself."""
    budget = 8
    scores = Protocol("stream").score(_engine("streaming_llm", budget=budget), text_ids)
    rows, keys = torch.arange(len(text_ids))[:, None], torch.arange(len(text_ids))[None, :]
    visible = (keys < SINKS) | (keys >= rows - (budget - SINKS))
    torch.testing.assert_close(scores.logprobs, _transformers_logprobs(text_ids, visible), atol=1e-4, rtol=0)
    assert (scores.logprobs - _transformers_logprobs(text_ids)).abs().max() > 0.1
    assert scores.kept_tokens == budget


def test_chunked_tokens_see_the_compressed_past_and_their_own_chunk(text_ids):
    """Chunks of 16 at budget 8: a token sees the sinks, the 4 newest tokens before its chunk, and its chunk so far."""
    budget, chunk = 8, 16
    scores = Protocol("chunked", chunk).score(_engine("streaming_llm", budget=budget), text_ids)
    rows, keys = torch.arange(len(text_ids))[:, None], torch.arange(len(text_ids))[None, :]
    visible = (keys < SINKS) | (keys >= rows // chunk * chunk - (budget - SINKS))
    torch.testing.assert_close(scores.logprobs, _transformers_logprobs(text_ids, visible), atol=1e-4, rtol=0)
    assert (scores.logprobs - _transformers_logprobs(text_ids)).abs().max() > 0.1


def test_prompt_only_method_compresses_nothing_in_the_stream_protocol(text_ids):
    """snapkv compresses the prompt only: the stream protocol's prompt is one token, so its cache grows as the full
    cache's (documented; the chunked protocol is the one for such methods)."""
    full = Protocol("stream").score(_engine("full"), text_ids)
    snapkv = Protocol("stream").score(_engine("snapkv", budget=8, window_size=4), text_ids)
    assert torch.equal(snapkv.logprobs, full.logprobs)
    chunked = Protocol("chunked", 16).score(_engine("snapkv", budget=8, window_size=4), text_ids)
    assert not torch.allclose(chunked.logprobs, full.logprobs, atol=1e-3)


def test_continuations_share_one_compressed_context(text_ids):
    """lm-eval's loglikelihood: each continuation scored after the same compression of the context, exactly as
    scoring context + continuation alone; the full cache's equal transformers' numbers."""
    context, continuations = text_ids[:40], [text_ids[40:48], text_ids[40:44], text_ids[50:53]]
    engine = _engine("h2o", budget=16)
    shared = score_continuations(engine, context, continuations)
    for continuation, scores in zip(continuations, shared):
        alone = score_tokens(engine, [*context, *continuation], prompt_length=len(context), score_from=len(context))
        assert scores.start == len(context) and torch.equal(scores.logprobs, alone.logprobs)
        assert torch.equal(scores.greedy, alone.greedy)
    full = score_continuations(_engine("full"), context, continuations[:1])[0]
    torch.testing.assert_close(full.logprobs, _transformers_logprobs(text_ids[:48])[39:], atol=1e-4, rtol=0)


def test_scoring_refuses_what_it_cannot_score(text_ids):
    with pytest.raises(EvalkvError, match="at least two tokens"):
        score_tokens(_engine("full"), text_ids[:1])
    with pytest.raises(EvalkvError, match="unknown perplexity protocol 'sliding'; known: stream, chunked"):
        Protocol("sliding")
    with pytest.raises(EvalkvError, match="chunk_size applies to the chunked protocol"):
        Protocol("stream", 16)


def _records(task_options: dict, method: str = "full", **method_options) -> list[dict]:
    from evalkv.run.pred import text_record

    task = build_task("perplexity", task_options)
    engine, method_built = _engine(method, **method_options), build_method(method, method_options)
    return [text_record(sample, method_built, sample.scoring.score(engine, sample.prompt_ids))
            for sample in task.samples(tiny_loaded())]


def test_text_file_records_aggregate_into_perplexity(tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 4)
    (tmp_path / "b.txt").write_text("Pack my box with five dozen liquor jugs. " * 2)
    records = _records({"dataset": "text", "text_path": str(tmp_path), "num_eval_tokens": 40, "bucket_size": 16})
    assert [record["id"] for record in records] == ["a", "b"]
    assert [record["scored_tokens"] for record in records] == [40, 40]
    assert all(record["task"] == "text" and record["first_scored"] == 1 and record["pred"] == "" for record in records)
    scores = score_records(records)
    every = [value for record in records for value in record["nll"]]
    assert scores["task_scores"]["text"] == round(math.exp(sum(every) / len(every)), 2)
    assert scores["metric"]["text"] == "perplexity" and scores["lower_is_better"] == ["text"]
    assert scores["average"] is None  # a perplexity is never averaged with scores
    buckets = scores["breakdown"]["text"]["nll_by_position"]
    assert list(buckets) == ["0", "16", "32"]  # positions 1-16, 17-32, 33-40
    first = [value for record in records for value in record["nll"][:16]]
    assert buckets["0"] == round(sum(first) / len(first), 4)
    assert scores["breakdown"]["text"]["ppl_by_position"]["0"] == round(math.exp(sum(first) / len(first)), 2)


def test_small_budget_changes_the_recorded_perplexity(tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3)
    options = {"dataset": "text", "text_path": str(tmp_path / "a.txt"), "num_eval_tokens": 60,
               "protocol": "chunked", "chunk_size": 16}
    full, small = _records(options)[0], _records(options, "snapkv", budget=8, window_size=4)[0]
    assert small["kept_tokens"] == 8 and full["kept_tokens"] == 61 and small["chunk_size"] == 16
    assert small["ppl"] != full["ppl"]


@pytest.mark.skipif(not (SHARED_DATA / "ruler" / "PaulGrahamEssays.json").exists(),
                    reason="needs the shared data folder's ruler/PaulGrahamEssays.json (EVALKV_SHARED_DATA)")
def test_paul_graham_essays_stream_with_eviction():
    """RULER's essays file (a .json with a text field) read as a text, scored token by token with streaming_llm."""
    options = {"dataset": "text", "text_path": str(SHARED_DATA / "ruler" / "PaulGrahamEssays.json"),
               "num_eval_tokens": 48}
    [sample] = build_task("perplexity", options).samples(tiny_loaded())
    essays = json.loads((SHARED_DATA / "ruler" / "PaulGrahamEssays.json").read_text())["text"]
    assert sample.prompt_ids == tiny_loaded().encode_prompt(essays[:2000])[:49]  # the text's first tokens
    full, streamed = _records(options)[0], _records(options, "streaming_llm", budget=8)[0]
    assert full["id"] == "PaulGrahamEssays" and full["length"] == 49 and len(full["nll"]) == 48
    assert full["nll"][:8] == streamed["nll"][:8]  # tokens 1-8 attend to at most 8 earlier ones: nothing evicted
    assert full["nll"][8:] != streamed["nll"][8:]


def test_local_dataset_folder_through_datasets(tmp_path):
    """dataset=wikitext from a local folder of data files (`datasets` reads it): rows joined into one text."""
    pytest.importorskip("datasets")
    rows = [" = Title = \n", "", " A first line of the article .\n", " And a second one .\n"]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    task = build_task("perplexity", {"dataset": "wikitext", "dataset_path": str(tmp_path), "num_eval_tokens": None})
    [sample] = task.samples(tiny_loaded())
    assert sample.id == "wikitext2" and sample.task == "wikitext2"
    assert sample.prompt_ids == tiny_loaded().encode_prompt("".join(rows))


@pytest.mark.parametrize("options, message", [
    ({"dataset": "text"}, "dataset=text reads task.text_path"),
    ({"dataset": "wiki"}, "unknown dataset 'wiki'; known: wikitext, pg19, text"),
    ({"protocol": "stream", "chunk_size": 8}, "chunk_size applies to the chunked protocol"),
    ({"protocol": "windows"}, "unknown perplexity protocol 'windows'; known: stream, chunked"),
    ({"num_eval_tokens": 0}, "must be >= 1"),
])
def test_task_refuses_bad_options(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_task("perplexity", options)


def test_unreachable_hub_says_what_to_do(tmp_path):
    pytest.importorskip("datasets")
    task = build_task("perplexity", {"dataset": "pg19", "dataset_path": str(tmp_path / "absent")})
    with pytest.raises(EvalkvError, match="task.dataset_path=<folder of its data files>"):
        next(task.samples(tiny_loaded()))


def test_pred_score_table_and_plot_of_perplexity_runs(tmp_path, capsys):
    """`evalkv pred task=perplexity` writes one record per text; score, table (perplexity left out of the average,
    the NLL-by-position view) and `plot position` read them."""
    from evalkv.cli import main

    (tmp_path / "story.txt").write_text("Once upon a time there was a cache that had to forget. " * 3)
    common = ["model=random-tiny-llama", "model.device=cpu", "progress=false", f"output_dir={tmp_path / 'results'}",
              "task=perplexity", "task.dataset=text", f"task.text_path={tmp_path / 'story.txt'}",
              "task.num_eval_tokens=40", "task.protocol=chunked", "task.chunk_size=8", "task.bucket_size=20"]
    assert main(["pred", *common, "method=full"]) == 0
    assert main(["pred", *common, "method=streaming_llm", "budget=8"]) == 0
    capsys.readouterr()
    assert main(["score", str(tmp_path / "results")]) == 0
    assert "text     perplexity" in capsys.readouterr().out
    assert main(["table", str(tmp_path / "results"), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model,method,budget,text,average"
    full_row, streaming_row = lines[1].split(","), lines[2].split(",")
    assert full_row[:3] == ["random-tiny-llama", "full", "-"] and full_row[4] == ""
    assert streaming_row[:3] == ["random-tiny-llama", "streaming_llm", "8"] and streaming_row[3] != full_row[3]
    assert main(["table", str(tmp_path / "results"), "--view", "nll_by_position", "--format", "csv"]) == 0
    # 40 scored positions in buckets of 20: two full buckets, no one-token bucket at the end
    assert capsys.readouterr().out.splitlines()[0] == "model,method,budget,text/0,text/20"
    output = tmp_path / "nll.png"
    assert main(["plot", "position", str(tmp_path / "results"), "-o", str(output)]) == 0
    assert output.stat().st_size > 0


def test_tables_leave_perplexity_out_of_the_average():
    import pandas as pd

    from evalkv.report.columns import averaged_tasks, with_categories

    frame = with_categories(pd.DataFrame({"passkey": [60.0, 40.0], "pg19": [9.5, 12.25], "text": [800.0, 950.0]}))
    assert list(frame.columns) == ["passkey", "pg19", "text", "average"]
    assert list(frame["average"]) == [60.0, 40.0]
    assert averaged_tasks(list(frame.columns))["average"] == ["passkey"]  # its interval is the passkey's
    assert with_categories(pd.DataFrame({"text": [800.0]}))["average"].isna().all()  # no score to average
