"""The `evalkv` command: pred, score, table, list, demo, data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evalkv.errors import EvalkvError, unknown_name

USAGE = """usage: evalkv COMMAND [ARGS]

commands:
  pred   KEY=VALUE ...         run a model x method x task (Hydra overrides; --multirun sweeps)
  score  PATH ...              score run directories or predictions .jsonl files, write scores.json
  table  PATH ... [--format]   one table of every run under the paths (md, csv, latex, json)
  list   methods|tasks|models  what is registered, one name per line
  demo                         the README's main job: passkey on the embedded model, full vs SnapKV vs StreamingLLM
  data   longbench|minilongbench-to-jsonl  fetch LongBench's data.zip / convert MiniLongBench to predictions

`evalkv COMMAND --help` explains each command.
"""

PRED_HELP = """usage: evalkv pred [--multirun] KEY=VALUE ...

Runs one model x method x task and appends one record per sample to <run dir>/predictions.jsonl (a killed or
interrupted run resumes where it stopped when the same command runs again). Prints the run directory last.

main keys (defaults in configs/config.yaml):
  model=NAME            a config in configs/model/ (evalkv list models); default qwen2.5-coder-0.5b-instruct
  method=NAME           an eviction method (evalkv list methods); default full
  task=NAME             a task (evalkv list tasks); default passkey
  budget=N              tokens kept per head per layer (window included), or compression_ratio=0.5
  task.n_samples=N      take at most N samples
  output_dir=DIR        runs go to DIR/<task>/<model>/<method>_<budget>/ (default results); or run_dir=DIR
  method.OPTION=VALUE   a method option, e.g. method.window_size=8 (options: configs/method/NAME.yaml, the
                        method's docstring); task.OPTION=VALUE and model.OPTION=VALUE likewise
  model.device=cpu|cuda|auto  model.dtype=auto|bfloat16|float16|float32  model.attn_implementation=sdpa|eager|...

examples:
  evalkv pred method=snapkv budget=128 task.lengths=[1024,2048]
  evalkv pred --multirun method=full,snapkv,streaming_llm budget=128
  evalkv pred model=hf model.path=meta-llama/Llama-3.1-8B-Instruct model.name=llama3.1 method=h2o budget=512

Hydra's own flags: evalkv pred --hydra-help
"""

_GROUPS = ("model", "method", "task")


def _group_options(group: str) -> list[str]:
    from evalkv.paths import configs_dir

    return sorted(path.stem for path in (configs_dir() / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    """Unknown `method=`/`model=`/`task=` values fail with evalkv's message before Hydra starts."""
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in _GROUPS:
            continue
        known = _group_options(key)
        for choice in value.split(","):
            if choice and choice not in known:
                raise unknown_name(key, choice, known, f"evalkv list {key}s")


def cmd_pred(args: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in args):
        print(PRED_HELP)
        return 0
    _check_group_choices([arg for arg in args if not arg.startswith("-")])
    import hydra

    from evalkv.config import register_configs
    from evalkv.paths import configs_dir
    from evalkv.run.pred import run_pred

    register_configs()
    failures: list[str] = []

    def job(cfg) -> None:
        try:
            run_dir = run_pred(cfg)
        except EvalkvError as error:  # a --multirun sweep goes on with its other jobs and reports at the end
            failures.append(str(error))
            print(f"evalkv pred: error: {error}", file=sys.stderr)
            return
        print(run_dir, flush=True)

    saved = sys.argv
    sys.argv = ["evalkv pred", *args]
    try:
        hydra.main(config_path=str(configs_dir()), config_name="config", version_base=None)(job)()
    finally:
        sys.argv = saved
    return 2 if failures else 0


def cmd_score(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv score", description="Score run directories or predictions .jsonl files (records need task, "
        "pred, answers; all_classes and length where the metric uses them) and write scores.json next to them.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--quiet", action="store_true", help="do not print the per-task tables")
    options = parser.parse_args(args)
    from evalkv.run.score import format_scores, score_paths

    for target, scores in score_paths(options.paths):
        if not options.quiet:
            print(f"{target}\n{format_scores(scores)}\n")
    return 0


def cmd_table(args: list[str]) -> int:
    from evalkv.report.table import FORMATS, table

    parser = argparse.ArgumentParser(
        prog="evalkv table", description="Aggregate every run under the paths into one table: rows model / method / "
        "budget, columns the tasks and their average (missing scores show as '-').")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--format", default="md", choices=FORMATS)
    parser.add_argument("-o", "--output", help="write the table to this file instead of stdout")
    options = parser.parse_args(args)
    text = table(options.paths, options.format)
    if options.output:
        from evalkv.run.records import write_text_atomic

        write_text_atomic(Path(options.output), text)
    else:
        print(text, end="")
    return 0


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def cmd_list(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="evalkv list", description="List registered names, one per line.")
    parser.add_argument("what", choices=("methods", "tasks", "models"))
    what = parser.parse_args(args).what
    if what == "methods":
        from evalkv.methods import METHODS, method_names

        rows = [(name, _first_line(METHODS[name].__doc__)) for name in method_names()]
    elif what == "tasks":
        from evalkv.tasks import TASKS, task_names

        rows = [(name, _first_line(TASKS[name].__doc__)) for name in task_names()]
    else:
        from evalkv.paths import configs_dir

        rows = []
        for name in _group_options("model"):
            first = (configs_dir() / "model" / f"{name}.yaml").read_text().splitlines()[0]
            rows.append((name, first.lstrip("# ").strip()))
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name.ljust(width)}  {description}".rstrip())
    return 0


def cmd_demo(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv demo", description="Passkey retrieval on the embedded model (Qwen2.5-Coder-0.5B-Instruct): "
        "full cache vs SnapKV vs StreamingLLM at one budget, scored and printed as a table.")
    parser.add_argument("--output-dir", default="results/demo")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--lengths", default="1024", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--depths", default="0,25,50,75,100", help="comma-separated key depths in percent")
    options = parser.parse_args(args)
    from evalkv.run.demo import run_demo

    print(run_demo(options.output_dir, options.budget, options.lengths, options.depths), end="")
    return 0


def cmd_data(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="evalkv data", description="Fetch or convert benchmark data.")
    kinds = parser.add_subparsers(dest="what", required=True, metavar="longbench|minilongbench-to-jsonl")
    longbench = kinds.add_parser(
        "longbench", help="download LongBench's data.zip from the hub and unpack it",
        description="Download LongBench's data.zip from the hub (THUDM/LongBench, now zai-org/LongBench), or take "
        "a local copy, check every file's row count, and unpack {task}.jsonl and {task}_e.jsonl into DEST "
        "(use it as task.data_dir). Nothing is written unless every file checks out.")
    longbench.add_argument("--dest", default="data/longbench", help="where the files go (default data/longbench)")
    longbench.add_argument("--from-archive", metavar="PATH", help="a data.zip already downloaded (works offline)")
    mini = kinds.add_parser(
        "minilongbench-to-jsonl", help="MiniLongBench's stored predictions as a predictions .jsonl",
        description="Write the predictions stored in a folder of MiniLongBench_{task}.json files as evalkv "
        "records (id, task, pred, answers, all_classes), for `evalkv score`.")
    mini.add_argument("source", metavar="DIR", help="folder of MiniLongBench_{task}.json files")
    mini.add_argument("output", metavar="FILE", help="the predictions .jsonl to write")
    options = parser.parse_args(args)
    if options.what == "longbench":
        from evalkv.tasks.longbench.data import fetch_longbench

        archive = Path(options.from_archive) if options.from_archive else None
        counts = fetch_longbench(Path(options.dest), archive)
        print(f"{len(counts)} files, {sum(counts.values())} rows (every row count as published) in:")
        print(options.dest)
    else:
        import json

        from evalkv.run.records import write_text_atomic
        from evalkv.tasks.longbench.data import minilongbench_records

        records = minilongbench_records(Path(options.source))
        write_text_atomic(Path(options.output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{len(records)} records over {len({r['task'] for r in records})} tasks")
        print(options.output)
    return 0


COMMANDS = {"pred": cmd_pred, "score": cmd_score, "table": cmd_table, "list": cmd_list, "demo": cmd_demo,
            "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"evalkv: error: {unknown_name('command', command, list(COMMANDS), 'evalkv --help')}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except EvalkvError as error:
        print(f"evalkv {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
