"""Reasoning tasks (issue 20): GSM8K, MATH-500 and AIME from local fixture files (the hub fails offline with advice),
prompts, k sampled generations per problem with derived seeds, math-verify scoring (pass@1, maj@k, pass@k, length,
finished share), the reasoning table view, and long generations with the cache held at its budget."""

from __future__ import annotations

import json
import threading

import pyarrow
import pyarrow.parquet
import pytest
from conftest import tiny_loaded, tiny_model
from report_runs import make_run

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.metrics import score_records
from evalkv.metrics.reasoning import answer_text, is_correct, majority_answer, parsed_answer
from evalkv.records import read_records
from evalkv.tasks import build_task
from evalkv.tasks.reasoning.task import PROMPTS, sample_seed

GSM8K_ROWS = [{"question": "Tom has 2 apples and buys 3. How many now?", "answer": "2+3=5\n#### 5"},
              {"question": "A box holds 1,000 pens and 200 more. How many?", "answer": "1000+200=1200\n#### 1,200"},
              {"question": "What is 7 times 6?", "answer": "#### 42"}]
MATH_ROWS = [{"problem": "Write $0.5$ as a fraction.", "solution": "...", "answer": "\\frac{1}{2}",
              "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
             {"problem": "Convert $(0,3)$ to polar coordinates.", "solution": "...",
              "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
              "unique_id": "test/precalculus/807.json"}]
AIME_ROWS = [{"ID": "2024-I-1", "Problem": "Find the number of minutes the walk takes her.", "Answer": 204}]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _task(name: str, **options):
    return build_task(name, options)


def test_gsm8k_reads_a_local_file_with_provenance_and_final_answers(tmp_path):
    task = _task("gsm8k", data_path=_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))
    problems = task.problems()
    assert [p.answer for p in problems] == ["5", "1200", "42"]
    assert [p.id for p in problems] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert problems[0].metadata["dataset"] == "gsm8k.jsonl"
    assert problems[0].metadata["dataset_revision"].startswith("sha256:")
    assert task.size() == 3 and task.max_new_tokens == 8192


def test_math500_reads_parquet_and_keeps_its_columns(tmp_path):
    path = tmp_path / "math500.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(MATH_ROWS), path)
    problems = _task("math500", data_path=str(path)).problems()
    assert [p.answer for p in problems] == [row["answer"] for row in MATH_ROWS]
    assert problems[1].metadata["unique_id"] == "test/precalculus/807.json" and problems[1].metadata["level"] == 2


def test_aime_takes_either_spelling_of_the_columns_and_names_records_by_year(tmp_path):
    task = _task("aime", year="2024", data_path=_jsonl(tmp_path / "aime.jsonl", AIME_ROWS))
    problem = task.problems()[0]
    assert (problem.task, problem.id, problem.answer) == ("aime24", "aime24-0", "204")
    assert problem.metadata["year"] == 2024 and problem.metadata["source_id"] == "2024-I-1"
    assert _task("aime", year="both").task_names == ["aime24", "aime25"]
    assert (task.samples_per_problem, task.max_new_tokens) == (64, 32768)


def test_the_hub_offline_fails_with_what_to_do(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EvalkvError, match=r"could not load openai/gsm8k .*task\.data_path=FILE.*to_json"):
        _task("gsm8k").problems()


@pytest.mark.parametrize("options, message", [
    ({"prompt": "r1"}, "unknown prompt 'r1'.*deepseek_r1"),
    ({"temperature": 0.0, "samples_per_problem": 4}, "all be the same"),
    ({"top_p": 1.5}, "top_p"),
    ({"samples_per_problem": 0}, "samples_per_problem"),
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        _task("math500", **options)


def test_bad_files_and_years_are_errors(tmp_path):
    with pytest.raises(EvalkvError, match="year must be 2024, 2025 or both"):
        _task("aime", year="2023")
    with pytest.raises(EvalkvError, match="one file"):
        _task("aime", year="both", data_path=str(tmp_path / "x.jsonl"))
    with pytest.raises(EvalkvError, match="is not a file"):
        _task("gsm8k", data_path=str(tmp_path / "missing.jsonl")).problems()
    (tmp_path / "bad.jsonl").write_text('{"question": "x"\n')
    with pytest.raises(EvalkvError, match="bad.jsonl:1: not a JSON line"):
        _task("gsm8k", data_path=str(tmp_path / "bad.jsonl")).problems()
    with pytest.raises(EvalkvError, match="no 'answer' column"):
        _task("gsm8k", data_path=_jsonl(tmp_path / "q.jsonl", [{"question": "x"}])).problems()


def test_samples_are_k_seeded_generations_of_each_prompt(tmp_path):
    model = tiny_loaded()
    task = _task("gsm8k", data_path=_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS), samples_per_problem=3)
    samples = list(task.samples(model))
    assert [s.id for s in samples[:4]] == ["gsm8k-0-s0", "gsm8k-0-s1", "gsm8k-0-s2", "gsm8k-1-s0"]
    text = PROMPTS["deepseek_r1"].format(problem=GSM8K_ROWS[0]["question"])
    assert text.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert samples[0].prompt_ids == model.encode_prompt(text, chat=True)
    assert model.tokenizer.decode(samples[0].prompt_ids).startswith("<|user|>")
    seeds = [s.sampling.seed for s in samples]
    assert len(set(seeds)) == len(samples) and seeds[1] == sample_seed(42, "gsm8k-0", 1)
    assert [s.seed for s in (x.sampling for x in samples)] == [s.sampling.seed for s in task.samples(model)]
    assert (samples[0].sampling.temperature, samples[0].sampling.top_p, samples[0].sampling.top_k) == (0.6, 0.95, 0)
    assert samples[4].metadata["problem"] == "gsm8k-1" and samples[4].metadata["sample_index"] == 1
    assert samples[4].metadata["sampling"]["seed"] == samples[4].sampling.seed and samples[4].answers == ["1200"]
    greedy = next(_task("gsm8k", data_path=str(tmp_path / "g.jsonl"), temperature=0.0, chat_template=False,
                        prompt="rkv").samples(model))
    assert greedy.sampling is None and greedy.metadata["sampling"] is None
    assert model.tokenizer.decode(greedy.prompt_ids).startswith("You are given a math problem.\n\nProblem: Tom")


@pytest.mark.parametrize("output, answers, expected", [
    ("So the answer is \\boxed{0.5}.", ["\\frac{1}{2}"], True),
    ("Thus $r=3$ and \\boxed{(3, \\pi/2)}", ["\\left( 3, \\frac{\\pi}{2} \\right)"], True),
    ("<think>maybe \\boxed{41}</think>The answer is \\boxed{42}.", ["42"], True),
    ("<think>maybe \\boxed{42}</think>The answer is \\boxed{41}.", ["42"], False),
    ("no answer at all", ["42"], False),
    ("\\boxed{1200}", ["1200"], True),
])
def test_math_verify_decides_correctness_on_the_answer_after_the_thought(output, answers, expected):
    assert is_correct(output, answers) is expected


def test_the_thought_is_cut_at_the_last_think_end_tag():
    assert answer_text("a</think>b</think>c") == "c" and answer_text("no tags") == "no tags"


def test_math_verify_works_outside_the_main_thread():
    """Its signal-based timeout is main-thread only; evalkv turns it off elsewhere instead of failing."""
    parsed_answer.cache_clear()
    found = []
    thread = threading.Thread(target=lambda: found.append(is_correct("\\boxed{\\frac{3}{4}}", ["0.75"])))
    thread.start()
    thread.join()
    assert found == [True]


def test_majority_groups_equivalent_answers_and_ignores_outputs_without_one():
    outputs = ["\\boxed{3}", "\\boxed{0.5}", "\\boxed{1/2}", "nothing", "\\boxed{\\frac{1}{2}}", "\\boxed{3}"]
    assert str(majority_answer(outputs)[0]) == "1/2"
    assert str(majority_answer(["\\boxed{7}", "\\boxed{8}"])[0]) == "7"  # a tie: the group formed first
    assert majority_answer(["none", "either"]) == ()


def _record(problem: str, index: int, pred: str, answer: str, tokens: int, finished: bool) -> dict:
    return {"id": f"{problem}-s{index}", "task": "math500", "pred": pred, "answers": [answer], "problem": problem,
            "new_tokens": tokens, "finished": finished}


def test_scores_give_pass_at_1_maj_at_k_pass_at_k_length_and_finished_share():
    records = [_record("p0", 0, "\\boxed{2}", "2", 100, True), _record("p0", 1, "\\boxed{3}", "2", 300, False),
               _record("p0", 2, "\\boxed{2.0}", "2", 200, True), _record("p1", 0, "\\boxed{5}", "4", 50, True),
               _record("p1", 1, "\\boxed{4}", "4", 50, True), _record("p1", 2, "\\boxed{5}", "4", 500, False)]
    scores = score_records(records)
    assert scores["task_scores"] == {"math500": 50.0}
    assert scores["metric"]["math500"].startswith("pass@1 (math-verify ")
    assert scores["breakdown"]["math500"]["reasoning"] == {
        "pass@1": 50.0, "maj@k": 50.0, "pass@k": 100.0, "new_tokens": 200.0, "finished": 66.67, "k": 3,
        "problems": 2}
    without_problem = [{k: v for k, v in r.items() if k != "problem"} for r in records]  # grouped by id instead
    assert score_records(without_problem)["breakdown"]["math500"]["reasoning"]["maj@k"] == 50.0


def _reasoning_run(folder, method: str, records: list[dict]) -> None:
    make_run(folder, [f"method={method}", "budget=128", "task=math500"], None)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_reasoning_view_shows_accuracy_and_length_side_by_side(tmp_path, capsys):
    good = [_record("p0", 0, "\\boxed{2}", "2", 100, True), _record("p0", 1, "\\boxed{2}", "2", 300, True)]
    bad = [_record("p0", 0, "\\boxed{1}", "2", 900, False), _record("p0", 1, "\\boxed{2}", "2", 1100, False)]
    _reasoning_run(tmp_path / "h2o", "h2o", bad)
    _reasoning_run(tmp_path / "snapkv", "snapkv", good)
    assert main(["table", str(tmp_path), "--view", "reasoning"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("| model | method | budget | math500/pass@1 | math500/maj@k | math500/pass@k | "
                        "math500/new_tokens | math500/finished | math500/k | math500/problems |")
    assert lines[2] == "| random-tiny-llama | h2o | 128 | 50.00 | 0.00 | 100.00 | 1000.00 | 0.00 | 2 | 1 |"
    assert lines[3] == "| random-tiny-llama | snapkv | 128 | 100.00 | 100.00 | 100.00 | 200.00 | 100.00 | 2 | 1 |"


@pytest.mark.parametrize("method, options", [
    ("h2o", {}), ("tova", {}), ("streaming_llm", {}), ("lru", {}),
    ("snapkv", {"decode_interval": 8, "decode_target": 48}),
])
def test_decode_time_eviction_holds_the_cache_while_sampling(method, options, tmp_path):
    """Methods that evict while decoding, and the decoding-time regime of a scorer, on a reasoning sample."""
    sample = next(_task("gsm8k", data_path=_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)).samples(tiny_loaded()))
    engine = Engine(tiny_model(), build_method(method, {"budget": 48, **options}))
    generation = engine.generate(sample.prompt_ids, 80, sampling=sample.sampling)
    assert len(generation.token_ids) == 80 and generation.kept_tokens <= 48
    assert generation.final_kept_tokens <= 48 + options.get("decode_interval", 0)


@pytest.mark.heavy
def test_two_thousand_sampled_tokens_with_h2o_keep_the_cache_at_its_budget(tmp_path):
    """A long chain of thought on the tiny model: the cache holds the budget, not the 2,000 generated tokens."""
    sample = next(_task("gsm8k", data_path=_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)).samples(tiny_loaded()))
    engine = Engine(tiny_model(), build_method("h2o", {"budget": 64}))
    generation = engine.generate(sample.prompt_ids, 2000, sampling=sample.sampling, keep_session=True)
    assert len(generation.token_ids) == 2000 and len(set(generation.token_ids)) > 50  # sampled, not one loop
    assert generation.final_kept_tokens == 64
    assert all(layer.keys.shape[-2] == 64 for layer in generation.session.cache.layers)
    assert generation.final_kv_bytes == generation.kv_bytes


TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false"]
TIMING = {"prefill_s", "decode_s", "decode_batch"}


def _pred(root, *overrides: str) -> list[dict]:
    assert main(["pred", *TINY, f"output_dir={root}", *overrides]) == 0
    (predictions,) = root.rglob("predictions.jsonl")
    return [{k: v for k, v in record.items() if k not in TIMING} for record in read_records(predictions)]


def test_sampled_runs_are_reproducible_batched_or_not_and_after_resuming(tmp_path):
    """Each sample's seed is its own: a run in batches of 4, and one decoding one sample at a time that is resumed
    after 3 of its 6 samples, write the same records."""
    data = _jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    args = ["task=gsm8k", f"task.data_path={data}", "task.samples_per_problem=2", "task.max_new_tokens=24",
            "method=h2o", "budget=32"]
    batched = _pred(tmp_path / "batched", *args, "batch_size=4")
    _pred(tmp_path / "resumed", *args, "batch_size=1", "task.n_samples=3")
    resumed = _pred(tmp_path / "resumed", *args, "batch_size=1")
    def batches(run: str) -> list[int]:
        return [r["decode_batch"] for r in read_records(next((tmp_path / run).rglob("predictions.jsonl")))]

    assert batches("resumed") == [1] * 6 and max(batches("batched")) > 1
    assert batched == resumed and len(batched) == 6
    assert [r["id"] for r in batched] == [f"gsm8k-{p}-s{j}" for p in range(3) for j in range(2)]
    assert batched[0]["pred"] != batched[1]["pred"]  # the two samples of a problem differ
    assert all(isinstance(r["finished"], bool) and r["new_tokens"] <= 24 for r in batched)
    assert all(r["final_kept_tokens"] <= 32 and r["sampling"]["temperature"] == 0.6 for r in batched)
    assert main(["score", str(next((tmp_path / "batched").rglob("predictions.jsonl")).parent)]) == 0
