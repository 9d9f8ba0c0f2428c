"""`evalkv score`: score run directories or predictions files and write `scores.json` next to them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.metrics import METRICS, score_records
from evalkv.run.records import PREDICTIONS, SCORES, read_records, write_json_atomic


def _records_of_file(path: Path) -> list[dict]:
    records = read_records(path)
    for record in records:
        # Files from other harnesses (LongBench's pred/<model>/<task>.jsonl) name the task in the file name only.
        if "task" not in record and path.stem in METRICS:
            record["task"] = path.stem
    return records


def score_targets(paths: list[str]) -> list[tuple[Path, list[Path]]]:
    """(scores.json path, predictions files) pairs: one per run directory, one per folder of loose files."""
    groups: dict[Path, list[Path]] = defaultdict(list)
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            predictions = path / PREDICTIONS
            if not predictions.exists():
                raise EvalkvError(f"{path} is not a run directory: it has no {PREDICTIONS}")
            groups[path / SCORES].append(predictions)
        elif path.is_file():
            if path.suffix != ".jsonl":
                raise EvalkvError(f"{path}: expected a run directory or a predictions .jsonl file")
            groups[path.parent / SCORES].append(path)
        else:
            raise EvalkvError(f"{path} does not exist")
    return list(groups.items())


def score_files(files: list[Path]) -> dict:
    records = [record for path in files for record in _records_of_file(path)]
    if not records:
        raise EvalkvError(f"{', '.join(map(str, files))}: no records to score")
    return score_records(records)


def score_paths(paths: list[str]) -> list[tuple[Path, dict]]:
    results = []
    for target, files in score_targets(paths):
        scores = score_files(files)
        write_json_atomic(target, scores)
        results.append((target, scores))
    return results


def format_scores(scores: dict) -> str:
    rows = [("task", "metric", "n", "score")]
    for task, value in scores["task_scores"].items():
        rows.append((task, scores["metric"][task], str(scores["n"][task]), f"{value:.2f}"))
    rows.append(("average", "", str(sum(scores["n"].values())), f"{scores['average']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for group, summary in scores.get("groups", {}).items():
        categories = ", ".join(f"{name} {value:.2f}" for name, value in summary["categories"].items())
        lines.append(f"{group} ({summary['tasks']} tasks): average {summary['average']:.2f}; {categories}")
    return "\n".join(lines)
