"""The README's examples work as written."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import prompt_ids, tiny_model

from evalkv.kv.engine import Engine
from evalkv.methods import METHODS

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
