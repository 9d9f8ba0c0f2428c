"""evalkv as lm-evaluation-harness's `evalkv` model (evalkv/integrations/lm_eval.py): three tiny tasks defined by YAML
files over local jsonl data (multiple choice, generation, rolling loglikelihood) run through lm-eval itself; with the
full cache every response equals lm-eval's own `hf` model on the same weights, and eviction changes them."""

from __future__ import annotations

import json
import math

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'evalkv[lm_eval]')")

from conftest import tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from evalkv.errors import EvalkvError  # noqa: E402
from evalkv.integrations.lm_eval import EvalkvLM, cut_at_stops, main  # noqa: E402
from evalkv.models.presets import byte_tokenizer  # noqa: E402

TASKS = ["evalkv_tiny_choice", "evalkv_tiny_generate", "evalkv_tiny_rolling"]
DATA = {
    "choice": [{"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " moon", " quick cat"],
                "answer": 0},
               {"question": "Pack my box with five dozen", "choices": [" liquor jugs", " eggs"], "answer": 0}],
    "generate": [{"question": "Q: say hi\nA:", "answer": " hi"}, {"question": "Q: count to three\nA:", "answer": " 1"}],
    "rolling": [{"text": "The quick brown fox jumps over the lazy dog. Again and again the fox jumps over it."},
                {"text": "Pack my box with five dozen liquor jugs, said the sphinx of black quartz to the judge."}],
}
SPECIFIC = {
    "choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
              'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n',
    "generate": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                'generation_kwargs:\n  until: ["\\n", "Q:"]\n  max_gen_toks: 6\n  do_sample: false\n'
                "metric_list:\n  - metric: exact_match\n",
    "rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """The three tasks' YAML files and jsonl data (lm-eval's `json` dataset path: no hub)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in DATA.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: evalkv_tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {folder / 'datasets_cache'}\ntest_split: test\n{SPECIFIC[name]}")
    return folder


def _tasks(folder) -> TaskManager:
    """The tiny tasks alone (indexing lm-eval's own thousands of task files costs 16 s of CPU)."""
    return TaskManager(include_path=str(folder), include_defaults=False)


def _responses(output: dict) -> dict[str, list]:
    return {task: [sample["filtered_resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in output["samples"].items()}


@pytest.fixture(scope="module")
def full_cache_responses(task_folder):
    output = lm_eval.simple_evaluate(model="evalkv", model_args="model=random-tiny-llama,model.device=cpu,method=full",
                                     tasks=TASKS, task_manager=_tasks(task_folder),
                                     log_samples=True)
    return _responses(output), output["results"]


def test_full_cache_answers_as_lm_eval_hf_model(task_folder, full_cache_responses):
    from lm_eval.models.huggingface import HFLM

    model = tiny_model("tiny-llama")  # the weights random-tiny-llama loads (seed 0)
    model.set_attn_implementation("sdpa")
    reference = HFLM(pretrained=model, tokenizer=byte_tokenizer(), batch_size=1)
    expected = _responses(lm_eval.simple_evaluate(model=reference, tasks=TASKS, log_samples=True,
                                                  task_manager=_tasks(task_folder)))
    responses, results = full_cache_responses
    assert responses["evalkv_tiny_generate"] == expected["evalkv_tiny_generate"]
    for task in ("evalkv_tiny_choice", "evalkv_tiny_rolling"):
        flat = [value for sample in responses[task] for value in sample]
        reference_flat = [value for sample in expected[task] for value in sample]
        assert len(flat) == len(reference_flat) == (5 if task == "evalkv_tiny_choice" else 2)
        for got, want in zip(flat, reference_flat):
            got, want = (got, want) if task == "evalkv_tiny_choice" else ((got, False), (want, False))
            assert math.isclose(got[0], want[0], rel_tol=1e-5) and got[1] == want[1]
    assert set(results) == set(TASKS) and results["evalkv_tiny_rolling"]["bits_per_byte,none"] > 0


def test_eviction_changes_lm_eval_results_through_the_command_line(task_folder, full_cache_responses, tmp_path,
                                                                   monkeypatch):
    """`python -m evalkv.integrations.lm_eval` (lm-eval's own command line) with streaming_llm at budget 8: the
    documents (over 80 tokens) and long contexts are scored from the evicted cache, so the log-likelihoods move."""
    monkeypatch.chdir(tmp_path)
    indexing = TaskManager.__init__  # the command line indexes lm-eval's own tasks too: the tiny ones suffice here
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *args, **options: indexing(self, *args, **{**options, "include_defaults": False}))
    main(["--model", "evalkv", "--model_args", "model=random-tiny-llama,model.device=cpu,method=streaming_llm,"
          "budget=8,chunk_size=8", "--tasks", "evalkv_tiny_rolling,evalkv_tiny_choice", "--include_path",
          str(task_folder), "--output_path", str(tmp_path / "out"), "--log_samples"])
    samples = {path.name.split("_evalkv_tiny_")[1].split("_")[0]: [json.loads(line) for line in path.open()]
               for path in (tmp_path / "out").rglob("samples_*.jsonl")}
    rolling = [sample["filtered_resps"] for sample in sorted(samples["rolling"], key=lambda s: s["doc_id"])]
    full, _ = full_cache_responses
    assert len(rolling) == 2
    assert all(not math.isclose(float(got[0]), float(want[0]), rel_tol=1e-3)
               for got, want in zip(rolling, full["evalkv_tiny_rolling"]))


def test_sampling_is_refused_with_what_to_do():
    model = EvalkvLM(model="random-tiny-llama", method="full", device="cpu")
    request = Instance("generate_until", doc={}, arguments=("Q: hi\nA:", {"until": ["\n"], "temperature": 0.7}),
                       idx=0)
    with pytest.raises(EvalkvError, match="evalkv decodes greedily.*temperature=0"):
        model.generate_until([request])
    with pytest.raises(EvalkvError, match="unknown method 'snapkvv'"):
        EvalkvLM(model="random-tiny-llama", method="snapkvv")


def test_stop_strings_cut_the_generation_as_lm_eval_does():
    assert cut_at_stops("one\ntwo Q: three", ["Q:", "\n"]) == "one"
    assert cut_at_stops("no stop here", ["\n", ""]) == "no stop here"
