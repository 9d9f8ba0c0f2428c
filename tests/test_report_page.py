"""`evalkv report`: one self-contained HTML page with the tables and plots; rendered in headless Chromium when the
machine has it (scripts/test.sh installs it where apt-get runs as root)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from report_runs import make_run

from evalkv.cli import main


class PageParts(HTMLParser):
    """The tables (rows of cell texts), images and every external reference of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and not attrs[name].startswith("data:"):
                self.external.append(attrs[name])
        if tag == "table":
            self._table = attrs.get("class", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def _sweep(root):
    make_run(root / "full", ["method=full"], {"task_scores": {"passkey": 80.0}, "n": {"passkey": 5}})
    make_run(root / "snap64", ["method=snapkv", "budget=64"], {"task_scores": {"passkey": 40.0}, "n": {"passkey": 5}})
    make_run(root / "snap128", ["method=snapkv", "budget=128"], {"task_scores": {"passkey": 60.0},
                                                                 "n": {"passkey": 5}})
    make_run(root / "tova64", ["method=tova", "budget=64"], None, status="running")


def _report(tmp_path, capsys):
    _sweep(tmp_path / "results")
    output = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "results"), "-o", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    return output


def test_report_page_is_self_contained_with_tables_and_images(tmp_path, capsys):
    output = _report(tmp_path, capsys)
    page = PageParts()
    page.feed(output.read_text())
    assert page.external == []
    assert page.tables["scores"] == [
        ["model", "method", "budget", "passkey", "average"],
        ["random-tiny-llama", "full", "-", "80.00", "80.00"],
        ["random-tiny-llama", "snapkv", "64", "40.00", "40.00"],
        ["random-tiny-llama", "snapkv", "128", "60.00", "60.00"],
        ["random-tiny-llama", "tova", "64", "-", "-"],
    ]
    assert page.tables["deltas"][2] == ["random-tiny-llama", "snapkv", "64", "-40.00", "-40.00"]
    assert [row[4] for row in page.tables["runs"][1:]] == ["finished", "finished", "finished", "running"]
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert base64.b64decode(page.images[0].split(",", 1)[1]).startswith(b"\x89PNG")
    assert "unfinished run" in output.read_text()


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


def _headless(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (apt-get install chromium; "
                    "scripts/test.sh installs it when apt-get runs as root)")
def test_report_renders_in_headless_chromium(tmp_path, capsys):
    from PIL import Image

    output = _report(tmp_path, capsys)
    dom = _headless(tmp_path, "--dump-dom", output.as_uri()).stdout
    page = PageParts()
    page.feed(dom)
    assert page.tables["scores"][3] == ["random-tiny-llama", "snapkv", "128", "60.00", "60.00"]
    assert len(page.images) == 1 and re.search(r"<h2>Plots</h2>", dom)
    shot = tmp_path / "shot.png"
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", output.as_uri())
    pixels = Image.open(shot).convert("RGB")
    colours = {colour for _, colour in pixels.getcolors(maxcolors=1 << 24)}
    # matplotlib's tab10 blue and orange: the curves' lines were drawn, so the inline image was decoded
    assert any(abs(r - 31) + abs(g - 119) + abs(b - 180) < 30 for r, g, b in colours)
    assert any(abs(r - 255) + abs(g - 127) + abs(b - 14) < 30 for r, g, b in colours)
