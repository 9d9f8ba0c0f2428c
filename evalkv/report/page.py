"""`evalkv report`: one self-contained static HTML page with the tables and plots of a results folder.

The page holds `evalkv table`'s views (scores by category, differences from the full cache, RULER's per-length and
LongBench-E's per-bucket views, cost per sample) with the same numbers as the Markdown table, score-versus-budget
curves and needle heatmaps as inline PNG images, what the reader should know (unfinished runs, models without a
full-cache run), and the list of runs with their status and sample counts. No script, stylesheet or image is
fetched: the file can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

import evalkv
from evalkv.errors import EvalkvError
from evalkv.records import PREDICTIONS, read_records, write_text_atomic
from evalkv.report.curves import plot_curves
from evalkv.report.heatmap import plot_needle
from evalkv.report.runs import FULL, NO_BUDGET, RunScores, load_runs
from evalkv.report.table import against_full, build_table, formatted, notes

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
.scroll { overflow-x: auto; } .notes { color: #8a4b00; } img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 1em; } .heatmaps img { max-width: 520px; }
"""


def _html_table(frame: pd.DataFrame, deltas: bool = False, css_class: str = "") -> str:
    cells = formatted(frame, deltas).reset_index()
    texts = set(frame.index.names)
    header = "".join(f'<th class="{"text" if c in texts else ""}">{html.escape(str(c))}</th>' for c in cells.columns)
    rows = []
    for row in cells.itertuples(index=False):
        rows.append("<tr>" + "".join(f'<td class="{"text" if c in texts else ""}">{html.escape(str(v))}</td>'
                                     for c, v in zip(cells.columns, row)) + "</tr>")
    return (f'<div class="scroll"><table class="{css_class}"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _views(runs: list[RunScores]) -> tuple[list[str], list[str]]:
    """The table sections (HTML) and the notes."""
    scores = build_table(runs)
    sections = [f"<h2>Scores</h2>{_html_table(scores, css_class='scores')}"]
    methods = set(scores.index.get_level_values("method"))
    lacking: list[str] = []
    if FULL in methods and methods - {FULL}:
        deltas, lacking = against_full(scores)
        sections.append("<h2>Difference from the full cache</h2><p>Every row but the full cache's minus the "
                        f"full-cache row of the same model.</p>{_html_table(deltas, deltas=True, css_class='deltas')}")
    for view, heading in (("ruler", "RULER by context length"), ("longbench_e", "LongBench-E by length"),
                          ("timing", "Cost per sample (means)")):
        try:
            frame = build_table(runs, view)
        except EvalkvError:  # no run of that benchmark, or no timing recorded
            continue
        sections.append(f"<h2>{heading}</h2>{_html_table(frame, css_class=view)}")
    return sections, notes(runs, lacking)


def _figures(runs: list[RunScores], folder: Path) -> list[str]:
    figures, heatmaps = [], []
    scores = build_table(runs)
    if any(budget != NO_BUDGET for budget in scores.index.get_level_values("budget")):
        try:
            figures.append(_figure(plot_curves(scores, folder / "curves.png"), "Score versus budget"))
        except EvalkvError as error:  # e.g. absolute budgets mixed with compression ratios
            figures.append(f'<p class="notes">No curves: {html.escape(str(error))}</p>')
    for number, run in enumerate(runs):
        predictions = run.path / PREDICTIONS
        if predictions.exists() and any(r.get("task") == "needle" for r in read_records(predictions)):
            image = plot_needle([str(run.path)], str(folder / f"needle{number}.png"))
            heatmaps.append(_figure(image, f"Needle in a haystack: {run.model} / {run.method} / {run.budget}"))
    if heatmaps:
        figures.append(f'<div class="heatmaps">{"".join(heatmaps)}</div>')
    return figures


def _run_list(runs: list[RunScores], roots: list[str]) -> str:
    frame = pd.DataFrame([{
        "run": str(run.path), "model": run.model, "method": run.method, "budget": run.budget,
        "status": run.status, "samples": sum(run.scores.get("n", {}).values()),
        "tasks": ", ".join(f"{task} ({n})" for task, n in run.scores.get("n", {}).items()) or "-",
    } for run in runs])
    rows = "".join("<tr>" + "".join(f'<td class="text">{html.escape(str(v))}</td>' for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    header = "".join(f'<th class="text">{c}</th>' for c in frame.columns)
    return (f"<h2>Runs ({len(runs)})</h2><p>Under {html.escape(', '.join(roots))}.</p>"
            f'<div class="scroll"><table class="runs"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'
            "</div>")


def build_report(paths: list[str], output: str | Path, title: str | None = None) -> Path:
    """Write the report page of every run under the paths to `output`."""
    target = Path(output)
    skipped: list[str] = []
    runs = load_runs(paths, skipped)
    sections, warnings = _views(runs)
    warnings = [*skipped, *warnings]
    with tempfile.TemporaryDirectory() as folder:
        figures = _figures(runs, Path(folder))
    heading = html.escape(title or f"evalkv report: {', '.join(paths)}")
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes_html = "".join(f"<li>{html.escape(line)}</li>" for line in warnings)
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{heading}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{heading}</h1>",
        f"<p>{len(runs)} runs; made {made} by evalkv {evalkv.__version__}. Missing cells (-) are scores a run "
        "does not have, never 0.</p>",
        f'<ul class="notes">{notes_html}</ul>' if warnings else "",
        *sections,
        "<h2>Plots</h2>" + "".join(figures) if figures else "",
        _run_list(runs, paths),
        "</body></html>",
    ])
    write_text_atomic(target, page)
    return target
