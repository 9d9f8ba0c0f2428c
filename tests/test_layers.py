"""The layers import one way (engine <- methods <- tasks/metrics <- run <- report <- cli): reports read run files,
never the code that made them; tasks never reach into running or reporting. Checked on the source with `ast`, so
an import inside a function counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "evalkv"
# The registries' builders: a report that builds a method or task reads code, not the run's files.
BUILDERS = {"build_method", "method_class", "build_task", "task_class"}


def imports(folder: str) -> list[tuple[str, str, str]]:
    """(file, module, name) for every import under evalkv/<folder>; name is "" for `import module`."""
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = str(path.relative_to(PACKAGE.parent))
            if isinstance(node, ast.Import):
                found += [(where, alias.name, "") for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found += [(where, node.module, alias.name) for alias in node.names]
    return found


def crossing(folder: str, forbidden: tuple[str, ...], builders: bool = False) -> list[str]:
    return [f"{where}: {module}" + (f".{name}" if name else "") for where, module, name in imports(folder)
            if module.startswith(forbidden) or (builders and name in BUILDERS)
            or any(f"{module}.{name}".startswith(prefix) for prefix in forbidden if name)]


def test_reports_import_nothing_from_running_methods_or_the_task_builders():
    assert crossing("report", ("evalkv.run", "evalkv.methods", "evalkv.config", "evalkv.kv"), builders=True) == []


def test_tasks_import_nothing_from_running_or_reporting():
    assert crossing("tasks", ("evalkv.run", "evalkv.report", "evalkv.cli")) == []


def test_metrics_import_nothing_from_running_or_reporting():
    assert crossing("metrics", ("evalkv.run", "evalkv.report", "evalkv.cli")) == []


def test_the_engine_imports_nothing_from_methods_tasks_running_or_reporting():
    assert crossing("kv", ("evalkv.methods", "evalkv.tasks", "evalkv.run", "evalkv.report", "evalkv.cli")) == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The check itself: a lazy import in a function body is found."""
    folder = tmp_path / "evalkv" / "probe"
    folder.mkdir(parents=True)
    (folder / "m.py").write_text("def f():\n    from evalkv.run.pred import run_pred\n    from evalkv.tasks import "
                                 "build_task\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path / "evalkv")
    assert crossing("probe", ("evalkv.run",), builders=True) == [
        "evalkv/probe/m.py: evalkv.run.pred.run_pred", "evalkv/probe/m.py: evalkv.tasks.build_task"]


def test_reports_and_scoring_load_without_torch():
    """`evalkv score`, `table`, `plot` and `report` read files: importing them (and the task and metric registries
    they read) must not import torch or transformers, which cost a report command several seconds each time."""
    code = ("import sys, evalkv.report.table, evalkv.report.page, evalkv.report.curves, evalkv.report.leaderboard, "
            "evalkv.report.kvpress, evalkv.metrics, evalkv.tasks; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
