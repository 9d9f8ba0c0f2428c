"""Run files: records appended one by one, corrupt lines reported by number, atomic whole-file writes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from evalkv.errors import EvalkvError
from evalkv.records import RecordWriter, drop_torn_tail, read_records, write_json_atomic, write_text_atomic


def test_records_round_trip(tmp_path):
    path = tmp_path / "predictions.jsonl"
    with RecordWriter(path) as writer:
        writer.write({"id": "a", "pred": "é"})
        writer.write({"id": "b", "pred": "x"})
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    assert "é" in path.read_text(encoding="utf-8")


def test_corrupt_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(EvalkvError, match=r"predictions.jsonl:2: corrupt record"):
        read_records(path)


def test_non_object_line_is_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(EvalkvError, match=r"p.jsonl:2: a record must be a JSON object"):
        read_records(path)


def test_write_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "pr')
    assert [r["id"] for r in read_records(path)] == ["a"]
    assert drop_torn_tail(path)
    assert path.read_text() == '{"id": "a"}\n'
    assert not drop_torn_tail(path)


def test_atomic_json_write_leaves_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "scores.json", {"average": 1.5})
    assert json.loads((tmp_path / "scores.json").read_text()) == {"average": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_permissions_of_an_ordinary_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "run.json", {})
        write_text_atomic(tmp_path / "run.json", "{}\n")  # replacing an existing file too
        (tmp_path / "plain").write_text("")  # what open() makes under this umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
