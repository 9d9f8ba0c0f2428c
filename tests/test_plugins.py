"""A method and a task from an installed plug-in distribution (the README's "Adding a method" example, declared in
the `evalkv.methods` entry-point group, and a task in `evalkv.tasks`) work in every command that takes them, with
evalkv's own messages for their misspelt or mistyped options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import readme_method_source

from evalkv.cli import main
from evalkv.methods import METHODS
from evalkv.methods.registry import REGISTRY as METHOD_REGISTRY
from evalkv.tasks import TASKS
from evalkv.tasks.registry import REGISTRY as TASK_REGISTRY

METHOD = "value_norm_plugin"
TASK = "short_passkey_plugin"
TINY = ["model=random-tiny-llama", "model.device=cpu", "progress=false"]
# The README example is a scorer: its own option, the base's and the regimes every scorer takes.
PLUGIN_OPTIONS = ("beta, budget, chunk_length, compression_ratio, critical, critical_epsilon, critical_first_stage, "
                  "decode_buffer, decode_interval, decode_target, floor_alpha, head_budgets, key_channel_ratio, "
                  "key_channel_recent, key_channel_window, layer_budgets, normalize, prefill_chunk, skip_layers, "
                  "window_size")
TASK_MODULE = f'''
from dataclasses import dataclass, field

from evalkv.tasks import register_task
from evalkv.tasks.passkey import Passkey

@register_task("{TASK}")
@dataclass
class ShortPasskey(Passkey):
    """Passkey at 256 tokens with the key at two depths (a plug-in task)."""

    lengths: list[int] = field(default_factory=lambda: [256])
    depths: list[float] = field(default_factory=lambda: [0.0, 50.0])
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding an installed distribution: two modules and their .dist-info with the entry points."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "evalkv_plugin_method.py").write_text(readme_method_source().replace('"value_norm_demo"', f'"{METHOD}"'))
    (folder / "evalkv_plugin_task.py").write_text(TASK_MODULE)
    info = folder / "evalkv_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evalkv-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[evalkv.methods]\n{METHOD} = evalkv_plugin_method\n\n"
                                           f"[evalkv.tasks]\n{TASK} = evalkv_plugin_task\n")
    return folder


@pytest.fixture
def plugin(site, monkeypatch):
    """The distribution on sys.path, as if installed; each registry reads its entry points again (once)."""
    monkeypatch.syspath_prepend(str(site))
    registered = dict(METHODS), dict(TASKS)
    for registry in (METHOD_REGISTRY, TASK_REGISTRY):
        monkeypatch.setattr(registry, "_discovered", False)
    yield site
    for current, before in zip((METHODS, TASKS), registered):
        current.clear()
        current.update(before)
    for module in ("evalkv_plugin_method", "evalkv_plugin_task"):
        sys.modules.pop(module, None)


def _refused(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "+method" not in err
    return err


def test_registries_read_the_entry_points_once_per_process(plugin, monkeypatch):
    import evalkv.registry

    reads = []
    real = evalkv.registry.entry_points
    monkeypatch.setattr(evalkv.registry, "entry_points", lambda **kw: reads.append(kw) or real(**kw))
    assert METHOD in METHOD_REGISTRY.names() and TASK in TASK_REGISTRY.names()
    METHOD_REGISTRY.names()
    with pytest.raises(Exception, match="unknown method 'nope'"):
        METHOD_REGISTRY.get("nope")
    assert reads == [{"group": "evalkv.methods"}, {"group": "evalkv.tasks"}]


def test_list_shows_the_plugins(plugin, capsys):
    assert main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "largest value norms" in lines[METHOD]
    assert main(["list", "tasks"]) == 0
    assert TASK in [line.split()[0] for line in capsys.readouterr().out.splitlines()]


def test_pred_score_table_report_and_plot_pattern_run_the_plugins(plugin, tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["pred", *TINY, f"method={METHOD}", f"task={TASK}", "budget=48", "method.window_size=4",
                 f"output_dir={results}"]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(record["kept_tokens"] == 48 for record in records)
    assert main(["score", str(run)]) == 0
    assert json.loads((run / "scores.json").read_text())["n"] == {"passkey": 2}
    assert main(["table", str(results), "--format", "csv"]) == 0
    assert f"{METHOD}-window_size=4" in capsys.readouterr().out
    assert main(["report", str(results), "-o", str(tmp_path / "report.html")]) == 0
    assert METHOD in (tmp_path / "report.html").read_text()
    for source in ([str(run)], [*TINY, f"method={METHOD}", f"task={TASK}", "budget=48"]):
        assert main(["plot", "pattern", *source, "-o", str(tmp_path / "pattern.png")]) == 0
        assert (tmp_path / "pattern.png").read_bytes().startswith(b"\x89PNG")


def test_bench_compares_the_plugin_with_per_method_options(plugin, tmp_path):
    report = tmp_path / "bench.json"
    assert main(["bench", "model=random-tiny-llama", "model.device=cpu", f"method=full,{METHOD}", "budget=32",
                 f"{METHOD}.window_size=4", "--lengths", "96", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
                 "-o", str(report)]) == 0
    rows = {row["method"]: row for row in json.loads(report.read_text())["rows"]}
    assert rows[METHOD]["kept_tokens"] == 32 and rows["full"]["kept_tokens"] == 96


@pytest.mark.parametrize("command", [["pred", f"method={METHOD}"], ["plot", "pattern", f"method={METHOD}"],
                                     ["bench", "--methods", f"full,{METHOD}"]], ids=["pred", "pattern", "bench"])
def test_the_plugins_misspelt_or_mistyped_option_is_refused_with_its_options(plugin, capsys, command):
    err = _refused(capsys, *command, *TINY[:2], "budget=32", "method.windw_size=3")
    assert "'windw_size' (did you mean 'window_size'?)" in err and PLUGIN_OPTIONS in err
    err = _refused(capsys, *command, *TINY[:2], "budget=32", "method.window_size=abc")
    assert "method.window_size=abc: method.window_size takes an integer, not 'abc'" in err


def test_the_plugin_tasks_misspelt_option_is_refused_with_its_options(plugin, capsys):
    err = _refused(capsys, "pred", *TINY[:2], f"task={TASK}", "task.lenghts=[256]")
    assert f"task '{TASK}' has no option 'lenghts' (did you mean 'lengths'?); its options: chat_template, compress, " \
           "depths, lengths, max_new_tokens, n_samples, samples_per_cell, seed" in err


@pytest.mark.heavy
def test_a_fresh_process_finds_the_plugin_and_refuses_its_misspelt_option_with_only_the_message(site, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, "-m", "evalkv.cli", "bench", *TINY[:2], f"--methods=full,{METHOD}",
                           f"{METHOD}.windw_size=8"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and list(tmp_path.iterdir()) == []
    assert done.stderr == (f"evalkv bench: error: method '{METHOD}' has no option 'windw_size' (did you mean "
                           f"'window_size'?); its options: {PLUGIN_OPTIONS}\n")
