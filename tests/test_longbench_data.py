"""LongBench data: finding and checking task files, the official files, and `evalkv data longbench` on a fake
data.zip (no network)."""

from __future__ import annotations

import json
import zipfile

import pytest
from conftest import SHARED_DATA, tiny_loaded
from longbench_fixtures import row, small_longbench, write_task

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.tasks import build_task
from evalkv.tasks.longbench import data
from evalkv.tasks.longbench.spec import PROMPTS, ROW_COUNTS

OFFICIAL = SHARED_DATA / "longbench"
OFFICIAL_TASKS = ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]


def _samples(tmp_path, **options):
    return list(build_task("longbench", {"data_dir": str(tmp_path), **options}).samples(tiny_loaded()))


def test_data_dir_is_required_and_missing_files_are_named(tmp_path):
    with pytest.raises(EvalkvError, match="needs task.data_dir"):
        _samples(tmp_path, data_dir=None)
    write_task(tmp_path, "hotpotqa", [row("hotpotqa", 0)])
    with pytest.raises(EvalkvError, match=r"qasper not found: looked for .*qasper.jsonl and .*data/qasper.jsonl"):
        _samples(tmp_path, tasks=["hotpotqa", "qasper"], check_row_counts=False)


def test_files_in_a_data_subfolder_are_found(tmp_path):
    write_task(tmp_path / "data", "hotpotqa", [row("hotpotqa", 0)])
    assert [s.id for s in _samples(tmp_path, tasks=["hotpotqa"], check_row_counts=False)] == ["hotpotqa/hotpotqa-0000"]


def test_row_counts_are_checked_unless_turned_off(tmp_path):
    small_longbench(tmp_path)
    with pytest.raises(EvalkvError, match=r"hotpotqa.jsonl has 3 rows; the official hotpotqa file has 200"):
        _samples(tmp_path, tasks=["hotpotqa"])
    assert len(_samples(tmp_path, tasks=["hotpotqa"], check_row_counts=False)) == 3


def test_every_count_is_checked_before_the_first_sample(tmp_path):
    write_task(tmp_path, "hotpotqa", [row("hotpotqa", i) for i in range(200)])
    write_task(tmp_path, "trec", [row("trec", 0, all_classes=["City"])])
    samples = build_task("longbench", {"data_dir": str(tmp_path), "tasks": ["hotpotqa", "trec"]}).samples(tiny_loaded())
    with pytest.raises(EvalkvError, match="trec.jsonl has 1 rows; the official trec file has 200"):
        next(samples)


def test_bad_rows_are_errors_with_their_line(tmp_path):
    path = write_task(tmp_path, "hotpotqa", [row("hotpotqa", 0)])
    path.write_text(path.read_text() + '{"input": "q", "answers": ["a"], "_id": "x"}\n')
    with pytest.raises(EvalkvError, match=r"hotpotqa.jsonl:2: a LongBench row needs .* missing context"):
        _samples(tmp_path, tasks=["hotpotqa"], check_row_counts=False)
    path.write_text("{not json\n")
    with pytest.raises(EvalkvError, match=r"hotpotqa.jsonl:1: not a JSON line"):
        _samples(tmp_path, tasks=["hotpotqa"], check_row_counts=False)


def test_repeated_ids_stay_unique_and_caps_apply(tmp_path):
    write_task(tmp_path, "hotpotqa", [row("hotpotqa", 0), row("hotpotqa", 0), row("hotpotqa", 1)])
    ids = [s.id for s in _samples(tmp_path, tasks=["hotpotqa"], check_row_counts=False)]
    assert ids == ["hotpotqa/hotpotqa-0000", "hotpotqa/hotpotqa-0000#2", "hotpotqa/hotpotqa-0001"]
    task = build_task("longbench", {"data_dir": str(tmp_path), "tasks": ["hotpotqa"], "check_row_counts": False,
                                    "samples_per_task": 2})
    assert task.size() == 2 and len(list(task.samples(tiny_loaded()))) == 2


@pytest.mark.parametrize("options,message", [
    ({"tasks": ["hotpotqaa"]}, "unknown task 'hotpotqaa'"),
    ({"tasks": ["narrativeqa_e"]}, "narrativeqa has no LongBench-E file"),
    ({"tasks": []}, "task.tasks is empty"),
    ({"samples_per_task": 0}, "samples_per_task must be >= 1"),
])
def test_bad_options_are_errors(options, message):
    with pytest.raises(EvalkvError, match=message):
        build_task("longbench", options)


def test_task_groups_expand_in_order():
    assert len(build_task("longbench", {"tasks": ["all"]}).task_names) == 21
    assert build_task("longbench", {"tasks": ["zh", "hotpotqa", "dureader"]}).task_names == [
        "multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh", "hotpotqa"]
    assert build_task("longbench", {"tasks": ["all_e"]}).task_names[:2] == ["qasper_e", "multifieldqa_en_e"]


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"the official LongBench files are not at {OFFICIAL}")
def test_official_files_load_with_their_row_counts():
    task = build_task("longbench", {"data_dir": str(OFFICIAL), "tasks": OFFICIAL_TASKS, "chat_template": False})
    assert task.size() == 600
    for name in OFFICIAL_TASKS:
        rows = data.read_rows(data.task_file(str(OFFICIAL), name), name)
        assert len(rows) == ROW_COUNTS[name] == 200 and {r["dataset"] for r in rows} == {name}
    model = tiny_loaded()
    first = next(iter(task.samples(model)))
    rows = data.read_rows(OFFICIAL / "multi_news.jsonl", "multi_news")
    assert first.id == f"multi_news/{rows[0]['_id']}" and first.length == rows[0]["length"]
    assert model.decode(first.prompt_ids) == PROMPTS["multi_news"].format(**rows[0])
    assert first.answers == rows[0]["answers"] and first.max_new_tokens == 512


def _fake_archive(path, counts=None, extra=()):
    counts = {**ROW_COUNTS, **(counts or {})}
    with zipfile.ZipFile(path, "w") as archive:
        for name, count in counts.items():
            lines = "".join(json.dumps(row(name, i)) + "\n" for i in range(count))
            archive.writestr(f"data/{name}.jsonl", lines)
        for member, text in extra:
            archive.writestr(member, text)
    return path


def test_data_longbench_unpacks_a_downloaded_archive(tmp_path, monkeypatch, capsys):
    archive = _fake_archive(tmp_path / "data.zip", extra=[("../evil.jsonl", "x"), ("data/../../evil2.jsonl", "x"),
                                                          ("README.md", "hi")])
    monkeypatch.setattr(data, "download_archive", lambda: archive)
    dest = tmp_path / "out" / "longbench"
    assert main(["data", "longbench", "--dest", str(dest)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{name}.jsonl" for name in ROW_COUNTS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["longbench"]  # no leftovers beside it
    assert not list(tmp_path.rglob("evil*"))
    assert data.count_rows(dest / "repobench-p_e.jsonl") == 300 and data.count_rows(dest / "qasper_e.jsonl") == 224
    task = build_task("longbench", {"data_dir": str(dest), "tasks": ["multifieldqa_en", "lcc"], "samples_per_task": 1})
    assert task.size() == 2


@pytest.mark.parametrize("counts,message", [({"hotpotqa": 199}, "has 199 rows; the official hotpotqa file has 200"),
                                            ({"lcc_e": 0}, None)])
def test_a_bad_archive_writes_nothing(tmp_path, counts, message):
    archive = _fake_archive(tmp_path / "data.zip", counts)
    if message is None:  # an archive without lcc_e
        with zipfile.ZipFile(archive) as source, zipfile.ZipFile(tmp_path / "partial.zip", "w") as target:
            for info in source.infolist():
                if info.filename != "data/lcc_e.jsonl":
                    target.writestr(info, source.read(info))
        archive, message = tmp_path / "partial.zip", "lacks lcc_e"
    with pytest.raises(EvalkvError, match=message):
        data.fetch_longbench(tmp_path / "dest", archive)
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest*"))


def test_not_a_zip_and_offline_are_clear_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "data.zip").write_text("not a zip")
    assert main(["data", "longbench", "--from-archive", str(tmp_path / "data.zip"), "--dest", str(tmp_path / "d")]) == 2
    assert "is not a zip archive" in capsys.readouterr().err

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    assert main(["data", "longbench", "--dest", str(tmp_path / "d")]) == 2
    assert "--from-archive" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_minilongbench_conversion_checks_its_input(tmp_path):
    (tmp_path / "MiniLongBench_trec.json").write_text(json.dumps({
        "1": {"origin_prompt": "p1", "prediction": "City", "gold": {"answers": ["City"], "all_classes": ["City"]}},
        "0": {"origin_prompt": "p0", "prediction": "Other", "gold": {"answers": ["City"], "all_classes": ["City"]}},
    }))
    (tmp_path / "MiniLongBench_hotpotqa.json").write_text(json.dumps({"0": {"origin_prompt": "p", "prediction": "x",
                                                                           "gold": ["y"]}}))
    assert data.minilongbench_records(tmp_path) == [
        {"id": "hotpotqa/0", "task": "hotpotqa", "pred": "x", "answers": ["y"], "all_classes": None},
        {"id": "trec/0", "task": "trec", "pred": "Other", "answers": ["City"], "all_classes": ["City"]},
        {"id": "trec/1", "task": "trec", "pred": "City", "answers": ["City"], "all_classes": ["City"]},
    ]
    (tmp_path / "MiniLongBench_lcc.json").write_text(json.dumps({"0": {"origin_prompt": "p", "gold": ["y"]}}))
    with pytest.raises(EvalkvError, match="entry 0 has no prediction"):
        data.minilongbench_records(tmp_path)
    (tmp_path / "MiniLongBench_lcc.json").write_text(json.dumps({"0": {"origin_prompt": "p"}}))
    with pytest.raises(EvalkvError, match="needs origin_prompt .* and gold answers"):
        data.minilongbench_records(tmp_path)
    (tmp_path / "MiniLongBench_nq.json").write_text("{}")
    with pytest.raises(EvalkvError, match="unknown tasks: nq"):
        data.minilongbench_records(tmp_path)
