"""LongBench data on disk: the official task files (`{task}.jsonl`, `{task}_e.jsonl`, the layout of the hub's
`data.zip`), fetching and unpacking that archive, and MiniLongBench's pre-rendered samples.

Sources: THUDM/LongBench (hub dataset `THUDM/LongBench`, now `zai-org/LongBench`, file `data.zip` holding
`data/{task}.jsonl` and `data/{task}_e.jsonl`); MilkThink-Lab/MiniLongBench
(`pred_data/example/MiniLongBench_{task}.json`, OpenCompass's output format). Row counts: `spec.ROW_COUNTS`.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from evalkv.errors import EvalkvError
from evalkv.tasks.longbench.spec import ROW_COUNTS, TASKS

HUB_REPOS = ("THUDM/LongBench", "zai-org/LongBench")  # the organisation was renamed; either serves data.zip
ARCHIVE = "data.zip"
REQUIRED_FIELDS = ("context", "input", "answers", "_id")
MINI_PREFIX = "MiniLongBench_"


def task_file(data_dir: str | None, name: str) -> Path:
    """`{data_dir}/{name}.jsonl`, or `{data_dir}/data/{name}.jsonl` (data.zip unpacked as it is)."""
    if not data_dir:
        raise EvalkvError(
            "longbench needs task.data_dir: a folder with the official {task}.jsonl files (data.zip unpacked); "
            "`evalkv data longbench --dest DIR` fetches them where the hub is reachable"
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise EvalkvError(f"task.data_dir {data_dir!r} is not a folder")
    candidates = [folder / f"{name}.jsonl", folder / "data" / f"{name}.jsonl"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EvalkvError(
        f"LongBench file for {name} not found: looked for {' and '.join(map(str, candidates))} "
        "(data.zip's layout; `evalkv data longbench --dest DIR` fetches it)"
    )


def count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def check_row_count(path: Path, name: str, count: int) -> None:
    """A file whose row count differs from the official one is an error (a truncated download, a filtered copy):
    scores over other rows are not LongBench's."""
    expected = ROW_COUNTS.get(name)
    if expected is not None and count != expected:
        raise EvalkvError(
            f"{path} has {count} rows; the official {name} file has {expected}. Re-fetch it "
            "(evalkv data longbench), or set task.check_row_counts=false to score this subset anyway"
        )


def read_rows(path: Path, name: str, check_count: bool = True) -> list[dict]:
    """The rows of one task file, each checked for the fields the prompt and the metric need (and, with
    `check_count`, their number)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalkvError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            missing = [key for key in REQUIRED_FIELDS if not isinstance(row, dict) or key not in row]
            if missing:
                raise EvalkvError(
                    f"{path}:{number}: a LongBench row needs {', '.join(REQUIRED_FIELDS)}; missing {', '.join(missing)}"
                )
            if not isinstance(row["answers"], list):
                raise EvalkvError(f"{path}:{number}: 'answers' must be a list of strings")
            rows.append(row)
    if check_count:
        check_row_count(path, name, len(rows))
    return rows


def download_hub_file(repos: tuple[str, ...], filename: str, advice: str) -> Path:
    """`filename` of the first hub dataset repository in `repos` that serves it (cached by huggingface_hub); offline,
    an error naming each failure, then `advice` (what to do with the file downloaded elsewhere)."""
    from huggingface_hub import hf_hub_download

    failures = []
    for repo in repos:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset"))
        except Exception as error:  # offline, gated, renamed: every hub failure ends in the same advice
            failures.append(f"{repo}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    raise EvalkvError(
        f"could not download {filename} from the hub ({'; '.join(failures)}). Where the hub is reachable, download "
        f"https://huggingface.co/datasets/{repos[0]}/resolve/main/{filename} and {advice}"
    )


def download_archive() -> Path:
    """data.zip from the hub; an error that says what to do when offline."""
    return download_hub_file(HUB_REPOS, ARCHIVE, f"run `evalkv data longbench --from-archive {ARCHIVE}`")


def _archive_members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Official file name (without .jsonl) -> member, for members named exactly `data/{name}.jsonl` or `{name}.jsonl`.

    Nothing else is extracted, so no member can write outside the destination (no path traversal).
    """
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.is_dir() or not (len(parts) == 1 or (len(parts) == 2 and parts[0] == "data")):
            continue
        name = parts[-1].removesuffix(".jsonl")
        if parts[-1].endswith(".jsonl") and name in ROW_COUNTS:
            if name in members:
                raise EvalkvError(f"the archive holds two files for {name}: {members[name].filename}, {info.filename}")
            members[name] = info
    return members


def install_archive(archive_path: Path, dest: Path) -> dict[str, int]:
    """Unpack LongBench's data.zip into `dest` as `{task}.jsonl` files, after checking every row count.

    Files go to a temporary folder beside `dest` first and are moved in only when all 34 files check out, so a bad
    archive leaves `dest` as it was. Returns rows per file.
    """
    if not archive_path.is_file():
        raise EvalkvError(f"{archive_path} does not exist")
    if not zipfile.is_zipfile(archive_path):
        raise EvalkvError(f"{archive_path} is not a zip archive (expected LongBench's {ARCHIVE})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _archive_members(archive)
            missing = [name for name in ROW_COUNTS if name not in members]
            if missing:
                raise EvalkvError(
                    f"{archive_path} lacks {', '.join(missing)} (expected data/{{task}}.jsonl for the 21 LongBench "
                    "tasks and data/{task}_e.jsonl for the 13 LongBench-E tasks)"
                )
            for name, info in members.items():
                with archive.open(info) as source, open(partial / f"{name}.jsonl", "wb") as target:
                    shutil.copyfileobj(source, target)
        counts = {name: len(read_rows(partial / f"{name}.jsonl", name)) for name in ROW_COUNTS}
        dest.mkdir(parents=True, exist_ok=True)
        for name in ROW_COUNTS:
            os.replace(partial / f"{name}.jsonl", dest / f"{name}.jsonl")
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return counts


def fetch_longbench(dest: Path, archive: Path | None = None) -> dict[str, int]:
    """`evalkv data longbench`: the archive given, or data.zip downloaded from the hub, unpacked into `dest`."""
    return install_archive(archive if archive is not None else download_archive(), dest)


@dataclass
class MiniSample:
    """One MiniLongBench entry: a pre-rendered LongBench prompt, some model's output, and the gold answers."""

    key: str
    prompt: str
    prediction: str | None
    answers: list[str]
    all_classes: list[str] | None


def minilongbench_file(data_dir: str | None, task: str) -> Path:
    if not data_dir:
        raise EvalkvError("minilongbench needs task.data_dir: the folder of MiniLongBench_{task}.json files")
    path = Path(data_dir) / f"{MINI_PREFIX}{task}.json"
    if not path.is_file():
        raise EvalkvError(f"MiniLongBench file for {task} not found: {path}")
    return path


def read_minilongbench(path: Path) -> list[MiniSample]:
    """The entries of one `MiniLongBench_{task}.json` (`{"0": {"origin_prompt", "prediction", "gold", ...}}`),
    in key order; `gold` is the answers list, or `{"all_classes", "answers"}` for trec and lsht."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise EvalkvError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise EvalkvError(f"{path}: expected an object of numbered entries")
    samples = []
    for key in sorted(data, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        entry = data[key]
        gold = entry.get("gold") if isinstance(entry, dict) else None
        answers, classes = (gold.get("answers"), gold.get("all_classes")) if isinstance(gold, dict) else (gold, None)
        if not isinstance(answers, list) or not isinstance(entry.get("origin_prompt"), str):
            raise EvalkvError(f"{path}: entry {key} needs origin_prompt (a string) and gold answers (a list)")
        samples.append(MiniSample(key, entry["origin_prompt"], entry.get("prediction"), answers, classes))
    return samples


def minilongbench_tasks(data_dir: Path) -> list[str]:
    """The LongBench tasks that have a MiniLongBench file in `data_dir`, in LongBench's order."""
    found = {path.stem.removeprefix(MINI_PREFIX) for path in data_dir.glob(f"{MINI_PREFIX}*.json")}
    unknown = sorted(found - set(TASKS))
    if unknown:
        raise EvalkvError(f"{data_dir}: MiniLongBench files for unknown tasks: {', '.join(unknown)}")
    if not found:
        raise EvalkvError(f"{data_dir} holds no {MINI_PREFIX}{{task}}.json files")
    return [task for task in TASKS if task in found]


def minilongbench_records(data_dir: Path) -> list[dict]:
    """MiniLongBench's stored predictions as evalkv prediction records (id, task, pred, answers, all_classes)."""
    if not data_dir.is_dir():
        raise EvalkvError(f"{data_dir} is not a folder")
    records = []
    for task in minilongbench_tasks(data_dir):
        path = data_dir / f"{MINI_PREFIX}{task}.json"
        for sample in read_minilongbench(path):
            if not isinstance(sample.prediction, str):
                raise EvalkvError(f"{path}: entry {sample.key} has no prediction (a string) to convert")
            records.append({"id": f"{task}/{sample.key}", "task": task, "pred": sample.prediction,
                            "answers": sample.answers, "all_classes": sample.all_classes})
    return records
