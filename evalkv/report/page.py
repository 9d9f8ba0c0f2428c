"""`evalkv report`: one self-contained static HTML page with the tables and plots of a results folder.

The page holds `evalkv table`'s views with the same numbers as the Markdown table: scores by category with their
95% intervals and the samples behind each cell, differences from the full cache with the paired tests' intervals,
p-values and minimum detectable differences (report/intervals.py), RULER's per-length and LongBench-E's per-bucket
views, passkey's and needle's scores by depth and by context length (with the needle heatmaps), cost per sample with
units; the score-versus-budget curves with their bands; what the reader should know (unfinished runs, models without
a full-cache run, cells without intervals); the list of runs with their status, samples and wall time; and each
run's configuration as its own `config.yaml` and `run.json` record it. Rows follow the tables' order everywhere (the
full cache first, budgets and compression ratios in numeric order). Images are inline PNGs; no script, stylesheet or
image is fetched, so the file can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

import evalkv
from evalkv.errors import EvalkvError
from evalkv.metrics.uncertainty import Resampling
from evalkv.records import CONFIG, PREDICTIONS, read_records, write_text_atomic
from evalkv.report.columns import category
from evalkv.report.curves import plot_curves
from evalkv.report.figure import sharper
from evalkv.report.heatmap import plot_needle
from evalkv.report.intervals import Bounds, interval_bounds, interval_cells, paired_bounds
from evalkv.report.runs import FULL, NO_BUDGET, RunScores, load_runs, run_cells
from evalkv.report.table import against_full, build_table, formatted, notes, row_of

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1600px; padding: 0 1.5em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.3em; }
p { max-width: 60em; } .notes { color: #8a4b00; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
td.long { white-space: normal; overflow-wrap: anywhere; min-width: 6em; max-width: 30em; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0; } figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
"""

# Cost columns (the timing view's fields, run.json's wall time) as the page labels them, with their units.
COST_LABELS = {
    "prompt_tokens": "prompt (tokens)", "new_tokens": "generated (tokens)",
    "kept_tokens": "kept (tokens per layer and KV head)", "prefill_s": "prefill (s)", "decode_s": "decode (s)",
    "wall_s": "wall (s)", "s_per_sample": "per sample (s)",
}
# Breakdowns drawn per task for the tasks outside a benchmark (passkey, needle): key -> heading's unit.
BREAKDOWNS = {"by_depth": "by depth (percent of the context before the inserted fact)",
              "by_context_length": "by context length (tokens)"}
WINDOW_OPTIONS = ("window_size", "recent_size", "num_recent")  # what a method calls its always-kept recent tokens
PAGE_FIGURE_WIDTH = 14.0  # inches at the figures' 100 dpi: about the page's width
SHARPNESS = 2  # pixels per displayed pixel of the inline images (sharp when zoomed and on dense screens)


def _html_table(cells: pd.DataFrame, css_class: str, texts: set[str]) -> str:
    """Cells already as text; columns named in `texts` are left-aligned labels."""
    columns = list(cells.columns)
    rows = []
    for row in cells.itertuples(index=False):
        rows.append("<tr>" + "".join(
            f'<td class="{_cell_class(c, texts)}">{html.escape(str(v))}</td>' for c, v in zip(columns, row)) + "</tr>")
    header = "".join(f'<th class="{"text" if c in texts else ""}">{html.escape(str(c))}</th>' for c in columns)
    return (f'<div class="scroll"><table class="{css_class}"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _cell_class(column: str, texts: set[str]) -> str:
    if column in ("run", "tasks (n)", "method options", "task options"):
        return "text long"
    return "text" if column in texts else ""


def _frame_table(frame: pd.DataFrame, css_class: str, deltas: bool = False) -> str:
    """A table view (rows model / method / budget) as `evalkv table` formats its cells."""
    return _html_table(formatted(frame, deltas).reset_index(), css_class, set(frame.index.names))


def _figure(path: Path, caption: str) -> str:
    """The PNG inline, shown at its 100-dpi size (it was saved with SHARPNESS times the pixels)."""
    png = path.read_bytes()
    width = int.from_bytes(png[16:20], "big") // SHARPNESS  # the IHDR chunk's width
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}" width="{width}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def in_table_order(runs: list[RunScores], scores: pd.DataFrame) -> list[RunScores]:
    """The runs in the order of the rows they fill (the full cache first, budgets numerically), then by path."""
    position = {key: number for number, key in enumerate(scores.index)}
    names = list(scores.index.names)
    return sorted(runs, key=lambda run: (position.get(row_of(run, names), len(position)), str(run.path)))


def sample_counts(runs: list[RunScores], scores: pd.DataFrame) -> pd.DataFrame:
    """Rows as the scores table's, columns its tasks: how many samples each score averages (`n` of scores.json)."""
    names = list(scores.index.names)
    counts: dict[tuple, dict[str, float]] = {}
    for run in runs:
        counts.setdefault(row_of(run, names), {}).update(run.scores.get("n", {}))
    tasks = [column for column in scores.columns if any(column in row for row in counts.values())]
    frame = pd.DataFrame([counts.get(key, {}) for key in scores.index], index=scores.index, dtype=float)
    return frame.reindex(tasks, axis=1)


def _count_cells(frame: pd.DataFrame) -> pd.DataFrame:
    cells = frame.astype(object)
    for column in frame.columns:
        cells[column] = ["-" if pd.isna(value) else f"{value:.0f}" for value in frame[column]]
    return cells.reset_index()


def _score_sections(runs: list[RunScores], scores: pd.DataFrame, bounds: Bounds,
                    resampling: Resampling) -> tuple[str, str, list[str], list[str]]:
    """Scores with their intervals and sample counts; the differences from the full cache with the paired tests;
    the models lacking a full-cache run; the notes on the intervals."""
    names = set(scores.index.names)
    section = (f"<h2>Scores</h2><p>On each benchmark's own scale (0-100), each with its 95% interval [low, high] "
               f"(see Uncertainty below); the samples behind each cell follow.</p>"
               f"{_html_table(interval_cells(scores, bounds).reset_index(), 'scores', names)}")
    counts = sample_counts(runs, scores)
    if not counts.columns.empty:
        section += (f"<h3>Samples per score (n)</h3>"
                    f"{_html_table(_count_cells(counts), 'samples', set(counts.index.names))}")
    methods = set(scores.index.get_level_values("method"))
    if not (FULL in methods and methods - {FULL}):
        return section, "", [], bounds.notes
    deltas, lacking = against_full(scores)
    paired = paired_bounds(runs, deltas, resampling)
    compared = [method != FULL for method in deltas.index.get_level_values("method")]
    tests = (f"<h3>Paired test p-values</h3><p>Two-sided sign-flip test of each difference on the samples both rows "
             f"have: the share of random sign patterns of the per-sample differences whose mean is at least as far "
             f"from 0 as the observed one.</p>"
             f"{_html_table(_number_cells(paired.p[compared], '.3g'), 'p-values', names)}"
             f"<h3>Minimum detectable difference</h3><p>The difference each comparison detects at alpha 0.05 with "
             f"power 0.8 at its sample count and observed spread: 2.80 x sd_diff / sqrt(n) (averages: stratified by "
             f"task); - where every paired difference is the same.</p>"
             f"{_html_table(_number_cells(paired.mdd[compared], '.2f'), 'mdd', names)}")
    section_deltas = ("<h2>Difference from the full cache</h2><p>Every row but the full cache's minus the full-cache "
                      "row of the same model, with the 95% interval of the paired difference on the samples both rows "
                      "have (matched by sample id); * marks a difference whose paired test gives p < 0.05 (each "
                      f"cell tested on its own, no correction for the table's many cells).</p>"
                      f"{_html_table(interval_cells(deltas, paired, deltas=True).reset_index(), 'deltas', names)}"
                      f"{tests}")
    return section, section_deltas, lacking, list(dict.fromkeys([*bounds.notes, *paired.notes]))


def _number_cells(frame: pd.DataFrame, spec: str) -> pd.DataFrame:
    return frame.map(lambda value: "-" if pd.isna(value) else f"{value:{spec}}").reset_index()


def _uncertainty(resampling: Resampling) -> str:
    return ("<h2>Uncertainty</h2><p>Intervals are 95% percentile bootstrap intervals over samples "
            f"({resampling.resamples} resamples, seed {resampling.seed}): a category's and the average's resample "
            "every task within itself and average the resampled task scores as the table does. Differences from the "
            "full cache pair the samples both rows have by sample id; their interval is the same bootstrap over the "
            "per-sample differences, their p-value a two-sided sign-flip permutation test (exact when the samples are "
            "few). The bands around the curves are the scores' intervals. Samples are treated as independent draws of "
            "their task.</p>")


def _view(runs: list[RunScores], view: str) -> pd.DataFrame | None:
    try:
        return build_table(runs, view)
    except EvalkvError:  # no run has that view (no run of that benchmark, no timing recorded)
        return None


def _benchmark_sections(runs: list[RunScores]) -> list[str]:
    sections = []
    for view, heading in (("ruler", "RULER by context length (tokens)"), ("longbench_e", "LongBench-E by length")):
        if (frame := _view(runs, view)) is not None:
            sections.append(f"<h2>{heading}</h2>{_frame_table(frame, view)}")
    return sections


def _breakdown_sections(runs: list[RunScores], folder: Path) -> list[str]:
    """Per task outside a benchmark (passkey, needle): its score by depth and by context length, and for needle
    the heatmap of every run with needle records."""
    tables: dict[str, list[str]] = {}
    for breakdown, heading in BREAKDOWNS.items():
        if (frame := _view(runs, breakdown)) is None:
            continue
        for task in dict.fromkeys(column.partition("/")[0] for column in frame.columns):
            if category(task) is not None:  # RULER's and LongBench-E's tasks have their benchmark's view
                continue
            part = frame[[c for c in frame.columns if c.partition("/")[0] == task]].dropna(how="all")
            part.columns = [column.partition("/")[2] for column in part.columns]
            tables.setdefault(task, []).append(f"<h3>{html.escape(task)} {heading}</h3>"
                                               f"{_frame_table(part, f'{task} {breakdown}')}")
    heatmaps = _needle_heatmaps(runs, folder)
    if heatmaps:
        tables.setdefault("needle", []).extend(heatmaps)
    if not tables:
        return []
    return ["<h2>By depth and context length</h2><p>Scores (0-100) of each depth or context length, over the "
            "samples of that cell.</p>" + "".join(part for task in sorted(tables) for part in tables[task])]


def _needle_heatmaps(runs: list[RunScores], folder: Path) -> list[str]:
    figures = []
    for number, run in enumerate(runs):
        predictions = run.path / PREDICTIONS
        if predictions.exists() and any(r.get("task") == "needle" for r in read_records(predictions)):
            image = plot_needle([str(run.path)], str(folder / f"needle{number}.png"), max_width=PAGE_FIGURE_WIDTH)
            figures.append(_figure(image, f"Needle in a haystack (mean recall 0-1 per depth and length): "
                                          f"{run.model} / {run.method} / budget {run.budget}"))
    return figures


def cost_per_task(frame: pd.DataFrame) -> pd.DataFrame:
    """The timing view (columns `task/field`) with one row per table row and task: columns the cost fields with
    their units, in the order evalkv records them; rows without any cost dropped."""
    tasks = list(dict.fromkeys(column.partition("/")[0] for column in frame.columns))
    keys, rows = [], []
    for key, row in zip(frame.index, frame.itertuples(index=False)):
        for task in tasks:
            values = {c.partition("/")[2]: v for c, v in zip(frame.columns, row) if c.partition("/")[0] == task}
            if not all(pd.isna(value) for value in values.values()):
                keys.append((*key, task))
                rows.append(values)
    long = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(keys, names=[*frame.index.names, "task"]), dtype=float)
    fields = [field for field in COST_LABELS if field in long.columns]
    fields += [field for field in long.columns if field not in COST_LABELS]
    return long[fields].rename(columns=COST_LABELS)


def _cost_section(runs: list[RunScores]) -> list[str]:
    if (frame := _view(runs, "timing")) is None:
        return []
    return ["<h2>Cost per sample (means)</h2><p>Means over each run's samples of one task: prompt and generated "
            "tokens, KV entries kept per layer and KV head after the prompt was compressed, prefill and decode wall "
            f"time.</p>{_frame_table(cost_per_task(frame), 'timing')}"]


def _curves(scores: pd.DataFrame, folder: Path, bounds: Bounds) -> list[str]:
    if all(budget == NO_BUDGET for budget in scores.index.get_level_values("budget")):
        return []
    try:
        return [_figure(plot_curves(scores, folder / "curves.png", bands=(bounds.low, bounds.high)),
                        "Score versus budget (shaded: 95% intervals)")]
    except EvalkvError as error:  # e.g. absolute budgets mixed with compression ratios
        return [f'<p class="notes">No curves: {html.escape(str(error))}</p>']


def _relative(path: Path, roots: list[str]) -> str:
    """A run's folder below the root it was found under (its own name when it is the root)."""
    for raw in roots:
        root = Path(raw).parent if Path(raw).is_file() else Path(raw)
        if path == root:
            return path.name or str(path)
        if path.is_relative_to(root):
            return str(path.relative_to(root))
    return str(path)


def _run_list(runs: list[RunScores], roots: list[str]) -> str:
    rows = []
    for run in runs:
        cost = run_cells(run.info)
        counts = run.scores.get("n", {})
        rows.append({
            "run": _relative(run.path, roots), "model": run.model, "method": run.method, "budget": run.budget,
            "status": run.status, "samples": str(sum(counts.values())) if counts else "-",
            "tasks (n)": ", ".join(f"{task} ({n})" for task, n in counts.items()) or "-",
            COST_LABELS["wall_s"]: _wall(cost),
            COST_LABELS["s_per_sample"]: _number(cost.get("s_per_sample")),
        })
    frame = pd.DataFrame(rows)
    texts = {"run", "model", "method", "budget", "status", "tasks (n)"}
    return (f"<h2>Runs ({len(runs)})</h2><p>Under {html.escape(', '.join(roots))}. Wall time sums the evalkv pred "
            "invocations that finished (an interrupted one records none, so the sum is then a lower bound).</p>"
            f"{_html_table(frame, 'runs', texts)}")


def _wall(cost: dict[str, float]) -> str:
    """The recorded wall time: a lower bound (>=) when an invocation was interrupted, none when all were."""
    if not cost or cost["interrupted"] == cost["invocations"]:
        return "-"
    return (">= " if cost["interrupted"] else "") + _number(cost["wall_s"])


def _number(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:g}"


def _plain(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(item) for item in value)
    return str(value)


def label_options(label: str) -> list[str]:
    """The option names in a run label (`snapkv_128-window_size=8-pooling=avg` -> window_size, pooling)."""
    return re.findall(r"-([A-Za-z_][A-Za-z0-9_]*)=", label)


def run_configuration(run: RunScores) -> dict[str, str]:
    """What a run was asked to do, from its own files: config.yaml's values, and which method and task options
    differed from their defaults as its labels say (the table's method label; run.json's task label)."""
    if not (run.path / CONFIG).exists():
        return {}
    cfg = OmegaConf.to_container(OmegaConf.load(run.path / CONFIG), resolve=True)
    method, task = cfg.get("method", {}), cfg.get("task", {})
    budgeted = run.budget != NO_BUDGET  # a method without a budget (the full cache) ignores budget= and ratio=
    window = next((method[name] for name in WINDOW_OPTIONS if method.get(name) is not None), None)
    method_options = [name for name in label_options(run.method) if name not in WINDOW_OPTIONS]
    task_options = [name for name in label_options(str(run.info.get("task", "")))
                    if name not in ("lengths", "depths")]
    task_options += [name for name, value in task.items() if name.endswith(("_path", "_dir")) and value]
    return {
        "model": run.model, "method": run.method, "task": str(task.get("name", "-")),
        "budget": _plain(method.get("budget")) if budgeted else "-",
        "compression ratio": _plain(method.get("compression_ratio")) if budgeted else "-",
        "window": _plain(window),
        "method options": ", ".join(f"{name}={_plain(method.get(name))}" for name in method_options) or "-",
        "lengths": _plain(task.get("lengths")), "depths": _plain(task.get("depths")),
        "sample cap": _plain(task.get("n_samples")) + (f" ({task['samples_per_task']} per task)"
                                                         if task.get("samples_per_task") else ""),
        "task options": ", ".join(f"{name}={_plain(task.get(name))}" for name in task_options) or "-",
    }


def _configurations(runs: list[RunScores]) -> str:
    rows = [config for run in runs if (config := run_configuration(run))]
    if not rows:
        return ""
    texts = {"model", "method", "method options", "task", "lengths", "depths", "task options"}
    return ("<h2>Run configuration</h2><p>From each run's config.yaml, in the order of the runs above: its budget or "
            "compression ratio (the share of the prompt evicted), recent window (tokens), the method and task "
            "options that differ from their defaults, the task's lengths (tokens) and depths (%) and its sample cap "
            "(task.n_samples, and task.samples_per_task where the task has one).</p>"
            f"{_html_table(pd.DataFrame(rows), 'config', texts)}")


def build_report(paths: list[str], output: str | Path, title: str | None = None,
                 resampling: Resampling | None = None) -> Path:
    """Write the report page of every run under the paths to `output`; `resampling`: the intervals' and paired
    tests' seed and resamples."""
    target = Path(output)
    skipped: list[str] = []
    runs = load_runs(paths, skipped)
    scores = build_table(runs)
    runs = in_table_order(runs, scores)
    resampling = resampling or Resampling()
    bounds = interval_bounds(runs, scores, resampling)
    scores_html, deltas_html, lacking, interval_notes = _score_sections(runs, scores, bounds, resampling)
    with tempfile.TemporaryDirectory() as folder, sharper(SHARPNESS):
        curves = _curves(scores, Path(folder), bounds)
        breakdowns = _breakdown_sections(runs, Path(folder))
    heading = html.escape(title or f"evalkv report: {', '.join(paths)}")
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes_html = "".join(f"<li>{html.escape(line)}</li>" for line in [*skipped, *notes(runs, lacking),
                                                                        *interval_notes])
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{heading}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{heading}</h1>",
        f"<p>{len(runs)} runs; made {made} by evalkv {evalkv.__version__}. Missing cells (-) are scores a run "
        "does not have, never 0.</p>",
        f'<ul class="notes">{notes_html}</ul>' if notes_html else "",
        scores_html,
        "<h2>Plots</h2>" + "".join(curves) if curves else "",
        deltas_html,
        _uncertainty(resampling),
        *_benchmark_sections(runs),
        *breakdowns,
        *_cost_section(runs),
        _run_list(runs, paths),
        _configurations(runs),
        "</body></html>",
    ])
    write_text_atomic(target, page)
    return target
