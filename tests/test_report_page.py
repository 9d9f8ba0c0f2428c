"""`evalkv report`: one self-contained HTML page with the tables and plots; rendered in headless Chromium when the
machine has it (scripts/test.sh installs it where apt-get runs as root)."""

from __future__ import annotations

import base64
import copy
import functools
import html
import io
import json
import math
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser

import pytest
from omegaconf import DictConfig, OmegaConf
from report_runs import make_run

from evalkv.cli import main
from evalkv.config import compose_run, options
from evalkv.methods import build_method
from evalkv.run.pred import method_label, task_label
from evalkv.tasks import build_task


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
            assert attrs.get("class", "") not in self.tables, f"two tables of class {attrs.get('class')!r}"
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
    # at two device pixels per CSS pixel, as the page's images are drawn: their thin dashed lines keep their colour
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1200,1400", "--force-device-scale-factor=2",
              output.as_uri())
    pixels = Image.open(shot).convert("RGB")
    colours = {colour for _, colour in pixels.getcolors(maxcolors=1 << 24)}
    # matplotlib's tab10 blue and orange: the curves' lines were drawn, so the inline image was decoded
    assert any(abs(r - 31) + abs(g - 119) + abs(b - 180) < 30 for r, g, b in colours)
    assert any(abs(r - 255) + abs(g - 127) + abs(b - 14) < 30 for r, g, b in colours)


# A sweep written as the files `evalkv pred` writes (no model runs): passkey at three budgets whose string order is
# not their numeric order, an option variant, two needle runs with predictions (the heatmaps), a running run.
PASSKEY_GRID = {"task.lengths": [256, 512], "task.depths": [0.0, 50.0, 100.0]}
NEEDLE_ANSWER = "The best thing to do in San Francisco is eat a sandwich."


@functools.cache
def _composed(method: str, task: str) -> DictConfig:
    return compose_run(["model=random-tiny-llama", f"method={method}", f"task={task}"])


def _config(method: str, task: str = "passkey", **values) -> DictConfig:
    """The composed config of the tiny model with these keys set (Hydra composes each method and task once: a
    composition takes a second on two cores)."""
    cfg = copy.deepcopy(_composed(method, task))
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def _write_run(folder, cfg: DictConfig, records: list[dict], status: str = "finished", scores: dict | None = None):
    """config.yaml, run.json (with the labels and one timed invocation) and predictions.jsonl as evalkv pred writes
    them, or scores.json alone when `scores` is given."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    method = build_method(cfg.method.name, options(cfg.method))
    task = build_task(cfg.task.name, options(cfg.task))
    invocation = {"wall_s": 0.5 * len(records), "new_samples": len(records)} if status == "finished" else {}
    (folder / "run.json").write_text(json.dumps({
        "status": status, "method": method_label(method), "task": task_label(task), "samples": len(records),
        "invocations": [invocation]}))
    if scores is not None:
        (folder / "scores.json").write_text(json.dumps(scores))
        return
    lines = io.StringIO()
    for number, record in enumerate(records):
        lines.write(json.dumps({"id": str(number), "all_classes": None, "new_tokens": 4, "kept_tokens": 64.0,
                                "prefill_s": 0.25, "decode_s": 0.125, **record}) + "\n")
    (folder / "predictions.jsonl").write_text(lines.getvalue())


def _passkey(correct_depths: set[float]) -> list[dict]:
    """Passkey records over PASSKEY_GRID, right at the given depths."""
    return [{"task": "passkey", "pred": "12345" if depth in correct_depths else "none", "answers": ["12345"],
             "length": length, "prompt_tokens": length, "context_length": length, "depth": float(depth)}
            for length in PASSKEY_GRID["task.lengths"] for depth in PASSKEY_GRID["task.depths"]]


def _needle(found: float) -> list[dict]:
    """Needle records at lengths 400 / 600 and depths 0 / 100: the full answer where depth is 0 or the length 400,
    `found` of its words elsewhere."""
    words = NEEDLE_ANSWER.split()
    return [{"task": "needle", "answers": [NEEDLE_ANSWER], "length": length, "prompt_tokens": length,
             "context_length": length, "depth": float(depth),
             "pred": NEEDLE_ANSWER if depth == 0 or length == 400 else " ".join(words[: round(found * len(words))])}
            for length in (400, 600) for depth in (0, 100)]


@pytest.fixture(scope="module")
def sweep_page(tmp_path_factory):
    """The report page of the sweep (parsed), its HTML and the results folder."""
    root = tmp_path_factory.mktemp("sweep") / "results"
    grid = {key.replace(".", "__"): values for key, values in PASSKEY_GRID.items()}
    _write_run(root / "passkey" / "full", _config("full", **grid), _passkey({0, 50, 100}))
    for budget, correct in ((128, {0}), (512, {0, 100}), (2048, {0, 50, 100})):
        _write_run(root / "passkey" / f"snapkv_{budget}", _config("snapkv", budget=budget, **grid), _passkey(correct))
    _write_run(root / "passkey" / "snapkv_128-window_size=8-pooling=avg",
               _config("snapkv", budget=128, method__pooling="avg", method__window_size=8, **grid), _passkey({0, 50}))
    _write_run(root / "passkey" / "streaming_llm_512", _config("streaming_llm", budget=512, **grid),
               _passkey({100})[:3], status="running")
    needle = _config("snapkv", "needle", budget=512, task__haystack_path=str(root.parent / "essays.json"),
                     task__lengths=[400, 600], task__depths=[0.0, 100.0])
    _write_run(root / "needle" / "snapkv", needle, _needle(0.5))
    needle.method = _composed("full", "passkey").method
    _write_run(root / "needle" / "full", needle, _needle(1.0))
    output = root.parent / "report.html"
    assert main(["report", str(root), "-o", str(output)]) == 0
    page = PageParts()
    page.feed(output.read_text())
    return page, output, root


def test_report_orders_budgets_numerically_with_the_full_cache_first(sweep_page):
    page, _, _ = sweep_page
    rows = [row[1:3] for row in page.tables["scores"][1:]]
    assert rows == [["full", "-"], ["snapkv", "128"], ["snapkv", "512"], ["snapkv", "2048"],
                    ["snapkv-window_size=8-pooling=avg", "128"], ["streaming_llm", "512"]]
    assert [row[2:4] for row in page.tables["runs"][1:]] == [
        ["full", "-"], ["full", "-"], ["snapkv", "128"], ["snapkv", "512"], ["snapkv", "512"], ["snapkv", "2048"],
        ["snapkv-window_size=8-pooling=avg", "128"], ["streaming_llm", "512"]]
    assert [row[:2] for row in page.tables["config"][1:]] == [row[1:3] for row in page.tables["runs"][1:]]


def test_report_ratio_labels_in_numeric_order(tmp_path, capsys):
    for ratio in (0.75, 0.25, 0.5):
        _write_run(tmp_path / f"h2o_r{ratio}", _config("h2o", compression_ratio=ratio), [],
                   scores={"task_scores": {"passkey": 50.0}, "n": {"passkey": 3}})
    _write_run(tmp_path / "full", _config("full"), [], scores={"task_scores": {"passkey": 80.0}, "n": {"passkey": 3}})
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "report.html")]) == 0
    page = PageParts()
    page.feed((tmp_path / "report.html").read_text())
    for table in ("scores", "samples", "deltas"):
        assert [row[2] for row in page.tables[table][1:]] == ["-", "r0.25", "r0.5", "r0.75"], table
    assert [row[3] for row in page.tables["runs"][1:]] == ["-", "r0.25", "r0.5", "r0.75"]
    assert [row[4] for row in page.tables["config"][1:]] == ["-", "0.25", "0.5", "0.75"]  # compression ratio


def test_report_gives_the_samples_behind_every_score(sweep_page):
    page, _, _ = sweep_page
    assert page.tables["samples"][0] == ["model", "method", "budget", "needle", "passkey"]
    assert [row[3:] for row in page.tables["samples"][1:]] == [
        ["4", "6"], ["-", "6"], ["4", "6"], ["-", "6"], ["-", "6"], ["-", "3"]]
    assert [row[5:7] for row in page.tables["runs"][1:3]] == [["4", "needle (4)"], ["6", "passkey (6)"]]


def test_report_shows_passkey_and_needle_by_depth_and_length(sweep_page):
    page, _, _ = sweep_page
    assert page.tables["passkey by_depth"][0] == ["model", "method", "budget", "0", "50", "100"]
    assert page.tables["passkey by_depth"][2] == ["random-tiny-llama", "snapkv", "128", "100.00", "0.00", "0.00"]
    assert page.tables["passkey by_depth"][3][3:] == ["100.00", "0.00", "100.00"]
    assert page.tables["passkey by_context_length"][0][3:] == ["256", "512"]
    assert page.tables["passkey by_context_length"][2][3:] == ["33.33", "33.33"]
    # needle rows only for the runs that have needle scores; recall at depth 100: length 400 whole, 600 half
    assert page.tables["needle by_depth"][1:] == [["random-tiny-llama", "full", "-", "100.00", "100.00"],
                                                 ["random-tiny-llama", "snapkv", "512", "100.00", "75.00"]]
    assert page.tables["needle by_context_length"][2][3:] == ["100.00", "75.00"]


def test_report_labels_cost_columns_with_units(sweep_page):
    page, _, _ = sweep_page
    assert page.tables["timing"][0] == ["model", "method", "budget", "task", "prompt (tokens)", "generated (tokens)",
                                        "kept (tokens per layer and KV head)", "prefill (s)", "decode (s)"]
    assert page.tables["timing"][1:3] == [  # one row per table row and task it has costs for
        ["random-tiny-llama", "full", "-", "needle", "500.00", "4.00", "64.00", "0.25", "0.1250"],
        ["random-tiny-llama", "full", "-", "passkey", "384.00", "4.00", "64.00", "0.25", "0.1250"]]
    assert page.tables["runs"][0][-2:] == ["wall (s)", "per sample (s)"]
    assert page.tables["runs"][2][-2:] == ["3", "0.5"]  # 6 samples, 0.5 s each
    assert page.tables["runs"][-1][-2:] == ["-", "-"]  # the running run's invocation has not finished


def test_report_gives_each_runs_configuration_from_its_files(sweep_page):
    page, _, _ = sweep_page
    header, *rows = page.tables["config"]
    by_method = {(row[0], row[1], row[2]): dict(zip(header, row)) for row in rows}
    variant = by_method[("random-tiny-llama", "snapkv-window_size=8-pooling=avg", "passkey")]
    assert (variant["budget"], variant["window"], variant["method options"]) == ("128", "8", "pooling=avg")
    assert (variant["lengths"], variant["depths"], variant["compression ratio"]) == ("256, 512", "0, 50, 100", "-")
    assert by_method[("random-tiny-llama", "snapkv", "passkey")]["window"] == "32"
    full = by_method[("random-tiny-llama", "full", "passkey")]
    assert (full["budget"], full["method options"], full["task options"]) == ("-", "-", "-")
    needle = by_method[("random-tiny-llama", "snapkv", "needle")]
    assert needle["task options"].startswith("haystack_path=") and needle["task options"].endswith("essays.json")
    assert needle["lengths"] == "400, 600"


def test_report_figures_are_inline_and_sized_for_the_page(sweep_page):
    from PIL import Image

    page, output, _ = sweep_page
    assert page.external == []
    assert len(page.images) == 3  # the curves and one heatmap per needle run
    sizes = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size for src in page.images]
    shown = [int(width) for width in re.findall(r'<img [^>]*width="(\d+)"', output.read_text())]
    assert [width // 2 for width, _ in sizes] == shown  # twice the pixels of the size shown: sharp when zoomed
    assert all(800 <= width <= 1400 for width in shown[1:]), shown  # the heatmaps read at the page's scale
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", output.read_text())
    assert [caption.rsplit(": ", 1)[1] for caption in captions[1:]] == [
        "random-tiny-llama / full / budget -", "random-tiny-llama / snapkv / budget 512"]


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (apt-get install chromium; "
                    "scripts/test.sh installs it when apt-get runs as root)")
def test_report_heatmaps_render_in_headless_chromium(sweep_page, tmp_path):
    from PIL import Image

    _, output, _ = sweep_page
    shot = tmp_path / "shot.png"
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", output.as_uri())
    colours = {colour for _, colour in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 24)}
    # the heatmaps' map at recall 1 (#0CD79F) and at 0.5 (#EBB839, snapkv's half-found needles)
    assert any(abs(r - 12) + abs(g - 215) + abs(b - 159) < 20 for r, g, b in colours)
    assert any(abs(r - 235) + abs(g - 184) + abs(b - 57) < 20 for r, g, b in colours)


def test_report_configuration_of_a_longbench_run_names_its_data_and_caps(tmp_path, capsys):
    cfg = _config("snapkv", "longbench", budget=128, task__data_dir="/data/longbench", task__tasks=["hotpotqa"],
                  task__samples_per_task=20, task__query_agnostic=True)
    _write_run(tmp_path / "lb", cfg, [], scores={"task_scores": {"hotpotqa": 30.0}, "n": {"hotpotqa": 20}})
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "report.html")]) == 0
    page = PageParts()
    page.feed((tmp_path / "report.html").read_text())
    config = dict(zip(*page.tables["config"]))
    assert config["task options"] == "tasks=hotpotqa, query_agnostic=True, data_dir=/data/longbench"
    assert (config["sample cap"], config["lengths"], config["window"]) == ("- (20 per task)", "-", "32")


def test_report_gives_intervals_and_paired_tests_against_the_full_cache(sweep_page):
    page, output, _ = sweep_page
    assert page.tables["scores"][2][:5] == ["random-tiny-llama", "snapkv", "128", "-", "33.33 [0.00, 66.67]"]
    # passkey: 6 samples; snapkv 128 misses 4 that the full cache finds, so 2 of the 2^4 sign patterns of its
    # non-zero differences are as extreme (p = 0.125, no *); the average pairs needle's 4 and passkey's 6 samples
    assert [row[1:] for row in page.tables["p-values"]] == [
        ["method", "budget", "needle", "passkey", "average"], ["snapkv", "128", "-", "0.125", "-"],
        ["snapkv", "512", "1", "0.5", "0.25"], ["snapkv", "2048", "-", "1", "-"],
        ["snapkv-window_size=8-pooling=avg", "128", "-", "0.5", "-"], ["streaming_llm", "512", "-", "0.5", "-"]]
    assert page.tables["deltas"][2][4].startswith("-66.67 [") and "*" not in page.tables["deltas"][2][4]
    differences = [0, -1, -1, 0, -1, -1]
    mdd = 2.8016 * 100 * statistics.stdev(differences) / math.sqrt(6)
    assert float(page.tables["mdd"][1][4]) == pytest.approx(mdd, abs=0.01)
    assert ("random-tiny-llama / streaming_llm / 512: passkey compared with the full cache on the 3 samples both "
            "have (3 and 6 scored)") in html.unescape(output.read_text())
    assert "<h2>Uncertainty</h2>" in output.read_text()
