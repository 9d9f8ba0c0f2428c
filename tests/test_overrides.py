"""One command-line dialect: every command that configures a model, method or task takes evalkv pred's `key=value`
overrides, and answers a misspelt key, a wrong type or an unknown name with evalkv's own one-paragraph message
(valid options, a did-you-mean), a non-zero exit and no traceback; a --multirun sweep is checked whole before any job
runs. (tests/test_plugins.py runs one such mistake in a fresh process.)"""

from __future__ import annotations

import pytest

from evalkv.cli import main
from evalkv.config import check_jobs
from evalkv.errors import EvalkvError
from evalkv.methods import METHODS
from evalkv.methods.obcache import OBCache
from evalkv.methods.registry import REGISTRY

TINY = ["model=random-tiny-llama", "model.device=cpu"]
SNAPKV_MISSPELT = ("method 'snapkv' has no option 'windw_size' (did you mean 'window_size'?); its options: beta, "
                   "budget, ")
BUDGET_TYPE = "budget=big: budget takes an integer or null, not 'big'"
UNKNOWN_SNAPKV = "unknown method 'snapkvv' (did you mean 'snapkv'?); known: adakv, "
LENGTHS_TYPE = "task.lengths=abc: task.lengths takes a list of integers such as [1,2], not 'abc'"
# Every command, a misspelt key, a wrong type and an unknown name, with the start of evalkv's message for each.
CASES = {
    "pred": [
        (["method=snapkv", "budget=64", "method.windw_size=8"], SNAPKV_MISSPELT),
        (["method=snapkv", "budget=big"], BUDGET_TYPE),
        (["method=snapkvv"], UNKNOWN_SNAPKV),
    ],
    "plot pattern": [
        (["method=snapkv", "budget=64", "method.windw_size=8"], SNAPKV_MISSPELT),
        (["method=snapkv", "budget=big"], BUDGET_TYPE),
        (["method=snapkvv"], UNKNOWN_SNAPKV),
    ],
    "bench": [
        (["--methods", "full,snapkv", "method.windw_size=8"],
         "method.windw_size=8: none of the methods (full, snapkv) has an option 'windw_size' (did you mean "
         "'window_size'?); their options: beta, budget, "),
        (["budget=big"], BUDGET_TYPE),
        (["method=full,snapkvv"], UNKNOWN_SNAPKV),
    ],
    "headmask": [
        (["task.lenghts=[256]", "-o", "x.csv"], "task 'ruler' has no option 'lenghts' (did you mean 'lengths'?)"),
        (["task.lengths=abc", "-o", "x.csv"], LENGTHS_TYPE),
        (["task=rulr", "-o", "x.csv"], "unknown task 'rulr' (did you mean 'ruler'?); known: aime, gsm8k, longbench, "),
    ],
    "train-policy": [
        (["task.lenghts=[256]", "-o", "x.safetensors"],
         "task 'passkey' has no option 'lenghts' (did you mean 'lengths'?); its options: chat_template, compress, "
         "depths, "),
        (["task.lengths=abc", "-o", "x.safetensors"], LENGTHS_TYPE),
        (["model=random-tiny-lama", "-o", "x.safetensors"],
         "unknown model 'random-tiny-lama' (did you mean 'random-tiny-llama'"),
    ],
    "demo": [
        (["task.lenghts=[256]"], "task 'passkey' has no option 'lenghts' (did you mean 'lengths'?)"),
        (["budget=big"], BUDGET_TYPE),
        (["model=random-tiny-lama"], "unknown model 'random-tiny-lama' (did you mean 'random-tiny-llama'"),
    ],
}


@pytest.mark.parametrize("command,arguments,message", [
    pytest.param(command, arguments, message, id=f"{command}-{mistake}") for command, cases in CASES.items()
    for (arguments, message), mistake in zip(cases, ("misspelt-key", "wrong-type", "unknown-name"))])
def test_every_command_explains_a_bad_key_type_or_name(tmp_path, monkeypatch, capsys, command, arguments, message):
    monkeypatch.chdir(tmp_path)  # nothing may be written; any file would land here
    assert main([*command.split(), *TINY, *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evalkv {command.split()[0]}: error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err and "+method" not in err and "+task" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments,message", [
    (["budgett=3"], "unknown key 'budgett' (did you mean 'budget'?); the keys are model=, method=, task="),
    (["+method.window_size=3"], "+method.window_size=3: evalkv's configs are typed, so keys are set"),
    (["method=snapkv,h2o"], "method=snapkv,h2o: several values make a sweep, which only evalkv pred --multirun runs"),
    (["task.lengths=[1"], "cannot read the override 'task.lengths=[1'"),
    (["snapkv.window_size=8"], "snapkv.window_size=8: options of method snapkv are written method.X=VALUE"),
    (["task=ruler", "task.tasks=[vt,nope]"], "unknown RULER task 'nope'"),
])
def test_pred_explains_other_mistakes(tmp_path, capsys, arguments, message):
    assert main(["pred", *TINY, f"output_dir={tmp_path}", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evalkv pred: error: {message}") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,arguments,message", [
    ("headmask", ["method=snapkv", "-o", "x.csv"], "evalkv headmask takes model=, model.X=, task=, task.X= "
     "overrides; method=snapkv is not one of them (its probe runs the full cache)"),
    ("bench", ["task=ruler"], "evalkv bench takes model=, model.X=, method=, method.X=, budget=, compression_ratio=, "
     "cache.X= overrides; task=ruler is not one of them"),
    ("bench", ["--methods", "full,snapkv", "h2o.recent_size=8"], "h2o.recent_size=8: h2o is not among the methods"),
    ("demo", ["method=h2o"], "evalkv demo takes model=, model.X=, method.X=, task.X=, budget="),
    ("demo", ["hydra.verbose=true"], "hydra.verbose=true: Hydra's own settings apply to evalkv pred only"),
])
def test_commands_refuse_keys_they_do_not_take(capsys, command, arguments, message):
    assert main([command, *TINY, *arguments]) == 2
    assert capsys.readouterr().err.startswith(f"evalkv {command}: error: {message}")


def test_a_sweep_with_a_bad_job_is_refused_once_before_any_model_loads(tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr("evalkv.run.pred.cached_model", lambda cfg: loads.append(cfg))
    for bad, message in (
        ("task.lengths=[10]", "method=snapkv budget=32: passkey: lengths must be token counts >= 64, got [10]"),
        ("method.window_size=8", "method=h2o budget=32: method 'h2o' has no option 'window_size'; its options: "),
        ("task.lenghts=[256]", "method=snapkv budget=32: task 'passkey' has no option 'lenghts' (did you mean "),
    ):
        assert main(["pred", "--multirun", *TINY, "method=snapkv,h2o", "budget=32,64", f"output_dir={tmp_path}",
                     bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"evalkv pred: error: in the sweep's job {message}"), err
        assert err.count("\n") == 1 and err.rstrip().endswith("(nothing ran)")
    assert loads == [] and list(tmp_path.iterdir()) == []  # no run folders, no Hydra sweep folder


def test_a_sweep_leaves_its_runs_and_no_empty_job_folders(tmp_path):
    assert main(["pred", "--multirun", *TINY, "progress=false", "method=full,tova", "budget=32",
                 "task.lengths=[256]", "task.n_samples=1", f"output_dir={tmp_path}"]) == 0
    sweep = next((tmp_path / "multirun").iterdir())
    assert [path.name for path in sweep.iterdir()] == ["multirun.yaml"]
    assert sorted(p.parent.name for p in tmp_path.rglob("predictions.jsonl")) == ["full", "tova_32"]


def test_a_sweep_is_checked_job_by_job_with_the_slurm_launcher():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher")
    sweep = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "method=snapkv,h2o", "budget=128,1024"]
    assert check_jobs([*TINY, *sweep], multirun=True) == 4
    with pytest.raises(EvalkvError, match="in the sweep's job method=h2o budget=128: method 'h2o' has no option"):
        check_jobs([*TINY, *sweep, "method.window_size=8"], multirun=True)


def test_list_methods_shows_presets_on_their_base_line(capsys):
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    presets = REGISTRY.presets("obcache")
    assert len(presets) == 25 and all(issubclass(METHODS[name], OBCache) for name in presets)
    every_preset = set(REGISTRY.preset_of)
    assert set(names) == set(METHODS) - every_preset and len(lines) == len(METHODS) - len(every_preset)
    obcache = lines[names.index("obcache")]
    assert obcache.endswith(f" Presets: {', '.join(presets)}.") and "kvcV+tova" in presets
    assert lines[names.index("snapkv")].endswith(" Presets: chunkkv.")


def test_demo_takes_overrides_and_applies_method_options_where_they_exist(tmp_path, capsys):
    assert main(["demo", *TINY, "progress=false", "task.lengths=[256]", "task.depths=[50]", "budget=48",
                 "method.window_size=8", "streaming_llm.n_sink=2", f"output_dir={tmp_path}"]) == 0
    runs = sorted(path.parent.name for path in tmp_path.rglob("predictions.jsonl"))
    assert runs == ["full", "snapkv_48-window_size=8", "streaming_llm_48-n_sink=2"]
    table = capsys.readouterr().out
    assert "| random-tiny-llama | snapkv-window_size=8 | 48 |" in table and "demo wall time" in table
