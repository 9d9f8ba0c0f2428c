"""The README's examples work as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import prompt_ids, tiny_model

from evalkv.cli import main
from evalkv.kv.engine import Engine
from evalkv.methods import METHODS
from evalkv.methods.registry import REGISTRY as METHOD_REGISTRY
from evalkv.overrides import group_choices
from evalkv.tasks import TASKS

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_method_source() -> str:
    """The Python code of the README's "Adding a method" section."""
    section = README.read_text().split("## Adding a method", 1)[1]
    code = re.search(r"\n((?:    .*\n|\n)+)", section).group(1)
    return "\n".join(line[4:] for line in code.splitlines())


def test_adding_a_method_example_runs(tokenizer):
    source = readme_method_source()
    namespace: dict = {}
    try:
        exec(compile(source, "README.md", "exec"), namespace)
        method = METHODS["value_norm_demo"](budget=48)
        generation = Engine(tiny_model(), method).generate(prompt_ids(tokenizer), 3, keep_session=True)
        assert generation.session.cache.lengths() == [48 + 2, 48 + 2]
    finally:
        METHODS.pop("value_norm_demo", None)


@pytest.mark.parametrize("what", ["methods", "tasks", "models"])
def test_list_prints_each_name_then_a_whole_sentence(what, capsys):
    assert main(["list", what]) == 0
    lines = capsys.readouterr().out.splitlines()
    presets = set(METHOD_REGISTRY.preset_of)  # listed on their base method's line
    names = {"methods": set(METHODS) - presets, "tasks": set(TASKS), "models": set(group_choices("model"))}[what]
    assert {line.split()[0] for line in lines} == names
    cut = [line for line in lines if not line.rstrip().endswith(".")]
    assert cut == [], "descriptions must be whole sentences, not cut where a comment line ends"


def _first_table(heading: str) -> list[str]:
    """The rows of the first Markdown table under a README heading (header and rule left out)."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    rows = re.search(r"((?:^\|.*\n)+)", section, re.MULTILINE).group(1).splitlines()
    return rows[2:]


def test_readme_tables_name_every_task_and_every_model():
    assert sorted(row.split("|")[1].strip(" `") for row in _first_table("## Tasks")) == sorted(TASKS)
    models = "\n".join(_first_table("## Models"))
    assert [name for name in group_choices("model") if f"`{name}`" not in models] == []
