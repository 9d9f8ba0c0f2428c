"""`evalkv data ruler`: the essays from a local copy (checked by sha256), kept when already there, clear errors offline
or for another file; NLTK's Punkt found where NLTK looks, an error that says how to get it otherwise. No network:
every download is replaced by a failing stand-in."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import nltk
import pytest
from ruler_helpers import ESSAYS, NLTK_DATA, needs_essays

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.tasks.ruler import data


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    def refuse_nltk(*args, **kwargs):
        raise ValueError("Error loading punkt_tab: network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(nltk, "download", refuse_nltk)


@needs_essays
def test_essays_from_a_local_copy_then_kept(tmp_path, capsys, offline):
    dest = tmp_path / "ruler"
    assert main(["data", "ruler", "--dest", str(dest), "--essays", str(ESSAYS)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == str(dest / "PaulGrahamEssays.json") and "copied from" in out[-2]
    assert f"{NLTK_DATA}" in out[0] and "already there" in out[0]
    assert hashlib.sha256((dest / "PaulGrahamEssays.json").read_bytes()).hexdigest() == data.ESSAYS_SHA256
    assert main(["data", "ruler", "--dest", str(dest)]) == 0  # offline, but nothing to download
    assert "already there" in capsys.readouterr().out


def test_another_essay_file_is_refused_before_anything_is_written(tmp_path, capsys, offline):
    other = tmp_path / "essays.json"
    other.write_text('{"text": "A different essay."}')
    assert main(["data", "ruler", "--dest", str(tmp_path / "ruler"), "--essays", str(other)]) == 2
    error = capsys.readouterr().err
    assert "not that of the published RULER essays" in error and "task.essay_path=FILE" in error
    assert not (tmp_path / "ruler").exists()


def test_offline_download_of_the_essays_says_what_to_do(tmp_path, capsys, offline):
    assert main(["data", "ruler", "--dest", str(tmp_path / "ruler")]) == 2
    error = capsys.readouterr().err
    assert "could not download RULER's essays" in error and "--essays PaulGrahamEssays.json" in error
    assert data.ESSAYS_URL in error and "\n" not in error.strip()


def test_offline_without_punkt_says_how_to_get_it(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    with pytest.raises(EvalkvError, match=r"could not download NLTK's punkt_tab into .*nltk\.download\('punkt_tab'\)"):
        data.fetch_punkt(tmp_path / "nltk")


@pytest.mark.skipif(not (NLTK_DATA / "tokenizers" / "punkt_tab").is_dir(), reason=f"no Punkt in {NLTK_DATA}")
def test_punkt_in_a_given_folder_is_found_and_the_user_told_to_name_it(monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [])
    folder, source = data.fetch_punkt(NLTK_DATA)
    assert folder == NLTK_DATA / "tokenizers" / "punkt_tab" / "english"
    assert "already there" in source and "NLTK_DATA" in source


def test_help_names_the_command_and_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "ruler", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: evalkv data ruler" in out
    assert all(option in out for option in ("--dest", "--essays", "--nltk-data"))
