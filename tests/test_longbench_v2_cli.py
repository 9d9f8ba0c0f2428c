"""`evalkv pred task=longbench_v2` on a tiny random model, then `evalkv score`, end to end; the chain of thought's
answer step through the run loop (`Sample.follow_up`)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_loaded
from longbench_v2_fixtures import small_data
from omegaconf import OmegaConf

from evalkv.cli import main
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.records import read_records
from evalkv.run.pred import FollowUps
from evalkv.tasks import Sample, build_task
from evalkv.tasks import longbench_v2 as v2

TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false"]


def _run(tmp_path: Path, capsys, *overrides: str) -> Path:
    assert main(["pred", *TINY, f"output_dir={tmp_path / 'results'}", *overrides]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_longbench_v2_run_and_score(tmp_path, capsys, monkeypatch):
    # Generation lengths cut from 128 / 1024 / 128: a random model's long outputs take seconds on the CPU.
    for prompt, tokens in (("0shot", 10), ("cot", 12), ("cot_answer", 14)):
        monkeypatch.setitem(v2.MAX_NEW_TOKENS, prompt, tokens)
    data = small_data(tmp_path / "data")
    common = ["task=longbench_v2", f"task.data_path={data}", "task.check_row_counts=false", "method=snapkv",
              "budget=64", "method.window_size=8"]
    run = _run(tmp_path, capsys, *common)
    assert "data_path" not in str(run) and run.parent.parent.name == "longbench_v2-check_row_counts=False"
    records = read_records(run / "predictions.jsonl")
    assert [r["task"] for r in records] == ["longbench_v2"] * 4
    assert [r["answers"] for r in records] == [["A"], ["B"], ["C"], ["D"]]
    assert [r["length"] for r in records] == ["short", "medium", "long", "short"]
    assert records[1]["difficulty"] == "hard" and records[1]["domain"] == "Multi-Document QA"
    assert all(r["query_aware"] and r["chat_template"] and r["new_tokens"] <= 10 for r in records)
    assert not any("answer_step" in r for r in records)

    assert main(["score", str(run)]) == 0
    scores = json.loads((run / "scores.json").read_text())
    assert scores["metric"] == {"longbench_v2": "longbench_v2_accuracy"} and scores["n"] == {"longbench_v2": 4}
    assert set(scores["breakdown"]["longbench_v2"]) == {"by_difficulty", "by_length", "by_domain", "compensated"}

    cot = _run(tmp_path, capsys, *common, "task.prompt=cot", "task.query_agnostic=true", "task.n_samples=2")
    records = read_records(cot / "predictions.jsonl")
    assert [r["task"] for r in records] == ["longbench_v2_cot"] * 2 and not records[0]["query_aware"]
    assert all(r["new_tokens"] <= 12 and r["answer_step"]["method"] == "full" for r in records)
    assert all(r["answer_step"]["new_tokens"] <= 14 and r["response_cot"] is not None for r in records)
    labels = json.loads((cot / "run.json").read_text())["labels"]
    assert labels["expected_tasks"] == ["longbench_v2_cot"] and labels["query"] == "agnostic"
    assert main(["score", str(cot)]) == 0
    assert json.loads((cot / "scores.json").read_text())["n"] == {"longbench_v2_cot": 2}


def test_follow_ups_run_with_the_full_cache_and_give_the_prediction(tmp_path):
    model = tiny_loaded()
    task = build_task("longbench_v2", {"data_path": str(small_data(tmp_path, 3)), "check_row_counts": False,
                                       "prompt": "cot"})
    samples = list(task.samples(model))
    samples[2].follow_up = None  # a sample without a second prompt keeps its own output
    method = build_method("snapkv", {"budget": 32, "window_size": 4})
    first = Engine(model.model, method, tokenizer=model.tokenizer).generate_batch(
        [_request(sample) for sample in samples])
    cfg = OmegaConf.create({"batch_size": 2, "mlp_chunk": None, "decode_graphs": "auto"})
    answers = FollowUps(model, cfg).generate(samples, first)
    assert answers[2] is None
    full = Engine(model.model, build_method("full", {}), tokenizer=model.tokenizer)
    for generation, (follow_up, step) in zip(first, answers[:2]):
        assert follow_up.metadata["response_cot"] == model.decode(generation.token_ids).strip()
        assert len(follow_up.prompt_ids) > 32  # longer than the budget: an evicting method would have cut it
        assert step.token_ids == full.generate(follow_up.prompt_ids, 128, model.stop_token_ids).token_ids
        assert step.kept_tokens == len(follow_up.prompt_ids)


def _request(sample: Sample):
    from evalkv.kv.engine import Request

    return Request(sample.prompt_ids, 8, suffix_ids=sample.suffix_ids)
