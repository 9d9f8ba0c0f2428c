"""`evalkv score`: score run directories or predictions files and write `scores.json` next to them."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.metrics import METRICS, score_records
from evalkv.metrics.uncertainty import Resampling, RowReplicates, run_mdd, task_samples
from evalkv.records import PREDICTIONS, SCORES, read_records, write_json_atomic


def _records_of_file(path: Path) -> list[dict]:
    records = read_records(path)
    for record in records:
        # Files from other harnesses (LongBench's pred/<model>/<task>.jsonl) name the task in the file name only.
        if "task" not in record and path.stem in METRICS:
            record["task"] = path.stem
    return records


def score_targets(paths: list[str]) -> list[tuple[Path, list[Path]]]:
    """(scores.json path, predictions files) pairs: one per run directory (a folder of runs gives each of them),
    one per folder of loose predictions files."""
    groups: dict[Path, list[Path]] = defaultdict(list)
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            runs = [path / PREDICTIONS] if (path / PREDICTIONS).exists() else sorted(path.rglob(PREDICTIONS))
            if not runs:
                raise EvalkvError(f"{path} holds no run: no {PREDICTIONS} in it or below it")
            for predictions in runs:
                groups[predictions.parent / SCORES].append(predictions)
        elif path.is_file():
            if path.suffix != ".jsonl":
                raise EvalkvError(f"{path}: expected a run directory or a predictions .jsonl file")
            groups[path.parent / SCORES].append(path)
        else:
            raise EvalkvError(f"{path} does not exist")
    return list(groups.items())


@dataclass
class ScoreOutcome:
    scored: list[tuple[Path, dict]] = field(default_factory=list)  # (scores.json written, its content)
    empty: list[Path] = field(default_factory=list)  # runs that hold no record yet: nothing to score, not an error
    unreadable: list[str] = field(default_factory=list)  # "PATH: why", skipped so the others are still scored


def score_paths(paths: list[str]) -> ScoreOutcome:
    """Score every run (or folder of predictions files) under the paths and write its scores.json."""
    outcome = ScoreOutcome()
    for target, files in score_targets(paths):
        try:
            records = [record for path in files for record in _records_of_file(path)]
            if not records:
                outcome.empty.append(target.parent)
                continue
            scores = score_records(records)
        except (EvalkvError, OSError, ValueError) as error:
            outcome.unreadable.append(f"{target.parent}: {error}")
            continue
        write_json_atomic(target, scores)
        outcome.scored.append((target, scores))
    return outcome


def format_scores(scores: dict, resampling: Resampling | None = None) -> str:
    """The per-task table `evalkv score` prints; with `resampling`, each score's 95% bootstrap interval (the
    average's stratified by task) and its minimum detectable difference (`uncertainty.run_mdd`)."""
    header = ("task", "metric", "n", "score") + (("95% interval", "mdd") if resampling else ())
    rows = [header]
    for task, value in scores["task_scores"].items():
        rows.append((task, scores["metric"][task], str(scores["n"][task]), f"{value:.2f}"))
    average = scores.get("average")
    rows.append(("average", "", str(sum(scores["n"].values())), "-" if average is None else f"{average:.2f}"))
    if resampling:
        rows[1:] = [(*row, *cells) for row, cells in zip(rows[1:], _uncertainty_cells(scores, resampling))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for name, summary in scores.get("groups", {}).items():
        parts = [f"average {summary['average']:.2f}"] if summary.get("average") is not None else []
        if summary.get("by_context_length"):
            parts.append(", ".join(f"{length} {value:.2f}" for length, value in summary["by_context_length"].items()))
        if summary.get("categories"):
            parts.append(", ".join(f"{category} {value:.2f}" for category, value in summary["categories"].items()))
        tasks = summary.get("tasks")
        count = len(tasks) if isinstance(tasks, list) else tasks
        if parts:
            label = f"{name} ({count} task{'s' if count != 1 else ''})" if count else name
            lines.append(f"{label}: " + "; ".join(parts))
    return "\n".join(lines)


def interval_note(resampling: Resampling) -> str:
    """What the interval and mdd columns of `format_scores` mean."""
    return (f"95% interval: percentile bootstrap over samples ({resampling.resamples} resamples, seed "
            f"{resampling.seed}; the average's stratified by task). mdd: the smallest difference from another method "
            "on the same samples that a paired test detects at alpha 0.05 with power 0.8, 2.80 x sd_diff / sqrt(n) "
            "(the average's: stratified by task), taking sd_diff = sqrt(2) x this run's sd (no correlation between "
            "the methods; evalkv report gives the observed one); - where every sample scored the same.")


def _uncertainty_cells(scores: dict, resampling: Resampling) -> list[tuple[str, str]]:
    """(interval, mdd) for each task row and the average row; `-` where the run has no per-sample scores."""
    samples = task_samples(scores)
    replicates = RowReplicates({task: found.scores for task, found in samples.items()}, resampling)
    groups = [[task] for task in scores["task_scores"]] + [list(scores["task_scores"])]
    cells = []
    for tasks in groups:
        interval = replicates.interval(tasks)
        mdd = run_mdd([samples[task].scores for task in tasks]) if all(t in samples for t in tasks) else math.nan
        cells.append(("-" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]",
                      "-" if math.isnan(mdd) else f"{mdd:.2f}"))
    return cells
