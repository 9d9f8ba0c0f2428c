"""`evalkv plot curves` and `evalkv plot pattern`: what the figures draw, and that they are written as PNG or PDF."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_loaded
from report_runs import make_run

from evalkv.cli import main
from evalkv.config import compose_run
from evalkv.errors import EvalkvError
from evalkv.report.curves import label_positions, series_points
from evalkv.report.pattern import plot_pattern
from evalkv.report.runs import load_runs
from evalkv.report.table import build_table
from evalkv.run import pattern as pattern_module
from evalkv.run.pattern import eviction_pattern

TINY_PASSKEY = ["model=random-tiny-llama", "model.device=cpu", "task.lengths=[256]", "task.depths=[50]"]


def _passkey_sweep(root):
    make_run(root / "full", ["method=full"], {"task_scores": {"passkey": 80.0}})
    for budget, score in ((32, 20.0), (64, 40.0)):
        make_run(root / f"snap{budget}", ["method=snapkv", f"budget={budget}"], {"task_scores": {"passkey": score}})
    make_run(root / "stream64", ["method=streaming_llm", "budget=64"], {"task_scores": {"passkey": 10.0}})
    make_run(root / "stream128", ["method=streaming_llm", "budget=128"], None, status="running")


def test_curves_draw_each_method_over_its_budgets_and_full_as_a_line(tmp_path):
    _passkey_sweep(tmp_path)
    frame = build_table(load_runs([str(tmp_path)]))
    lines, full = series_points(frame["passkey"], list(frame.index.names))
    assert full == {"full": 80.0}
    assert lines["snapkv"] == [(32.0, 20.0), (64.0, 40.0)]
    assert lines["streaming_llm"][0] == (64.0, 10.0)
    assert lines["streaming_llm"][1][0] == 128.0 and math.isnan(lines["streaming_llm"][1][1])  # a gap, not a 0


def test_line_names_never_overlap():
    placed = label_positions([50.0, 50.0, 51.0, 10.0], 0.0, 100.0)
    gaps = sorted(placed)
    assert all(b - a >= 6.0 - 1e-9 for a, b in zip(gaps, gaps[1:]))
    assert placed[3] == 10.0


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF")])
def test_plot_curves_writes_png_or_pdf(tmp_path, capsys, suffix, magic):
    _passkey_sweep(tmp_path / "runs")
    output = tmp_path / f"curves{suffix}"
    assert main(["plot", "curves", str(tmp_path / "runs"), "-o", str(output)]) == 0
    assert output.read_bytes().startswith(magic)
    assert main(["plot", "curves", str(tmp_path / "runs"), "-o", str(tmp_path / "curves.svg")]) == 2
    assert ".png or .pdf" in capsys.readouterr().err


def test_curves_need_a_budgeted_run(tmp_path, capsys):
    make_run(tmp_path / "full", ["method=full"], {"task_scores": {"passkey": 80.0}})
    assert main(["plot", "curves", str(tmp_path), "-o", str(tmp_path / "c.png")]) == 2
    assert "no run has a budget" in capsys.readouterr().err


def test_pattern_rows_hold_the_budget_and_the_observation_window(monkeypatch):
    monkeypatch.setattr("evalkv.models.loader.load_model", lambda cfg: tiny_loaded())
    cfg = compose_run([*TINY_PASSKEY, "method=snapkv", "budget=48", "method.window_size=8"])
    found = eviction_pattern(cfg, step=1)
    prompt = found.prompt_tokens
    assert found.kept.shape == (found.layers * found.heads, prompt + 1) and found.layers == 2
    assert (found.kept.sum(axis=1) == 48 + 1).all()  # the kept entries plus the token fed at step 1
    assert found.kept[:, prompt - 8:].all()  # SnapKV keeps its observation window and the new token
    full = eviction_pattern(compose_run([*TINY_PASSKEY, "method=full"]), step=2)
    assert full.kept.all() and full.kept.shape[1] == full.prompt_tokens + 2


def test_pattern_of_a_run_directory_uses_its_config_and_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("evalkv.models.loader.load_model", lambda cfg: tiny_loaded())
    run = make_run(tmp_path / "run", ["model.device=cpu", "task.lengths=[256]", "task.depths=[0,100]",
                                      "method=streaming_llm", "budget=40"], None)
    config = pattern_module.pattern_config([str(run)])
    assert config.method.name == "streaming_llm"
    found = eviction_pattern(config, "len256_depth100_0")
    assert found.sample_id == "len256_depth100_0"
    assert found.kept[:, :4].all() and (found.kept.sum(axis=1) == 41).all()  # 4 sinks + recent, + the new token
    output = plot_pattern(found, tmp_path / "pattern.pdf")
    assert output.read_bytes().startswith(b"%PDF")
    with pytest.raises(EvalkvError, match="no sample 'nope'.*len256_depth0_0"):
        eviction_pattern(config, "nope")


def test_pattern_reads_a_run_directory_whose_name_holds_options(tmp_path):
    run = make_run(tmp_path / "passkey-lengths=256" / "random-tiny-llama" / "snapkv_64",
                   ["task.lengths=[256]", "method=snapkv", "budget=64"], None)
    config = pattern_module.pattern_config([str(run)])
    assert (config.method.name, config.method.budget, list(config.task.lengths)) == ("snapkv", 64, [256])


def test_plot_pattern_command_writes_the_heatmap(tmp_path, capsys):
    output = tmp_path / "pattern.png"
    assert main(["plot", "pattern", *TINY_PASSKEY, "method=snapkv", "budget=48", "-o", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    assert output.read_bytes().startswith(b"\x89PNG")
    assert main(["plot", "pattern", str(tmp_path), "-o", str(output)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
