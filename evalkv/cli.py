"""The `evalkv` command: pred, score, table, plot, report, list, demo, data, bench, headmask, train-policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evalkv.errors import EvalkvError, unknown_name

USAGE = """usage: evalkv COMMAND [ARGS]

commands:
  pred   KEY=VALUE ...         run a model x method x task (Hydra overrides; --multirun sweeps)
  score  PATH ...              score run directories (or folders of runs) or predictions .jsonl files
  table  PATH ... [--format]   one table of every run under the paths (md, csv, latex, json)
  plot   curves|needle|pattern  score vs budget / ratio, needle heatmaps, one sample's eviction pattern (PNG/PDF)
  report PATH ... -o HTML      one self-contained page with the tables and plots of the runs under the paths
  list   methods|tasks|models  what is registered: a name and its description per line
  demo                         the README's main job: passkey on the embedded model, full vs SnapKV vs StreamingLLM
  bench                        speed and memory per method x context length (prefill, overhead, decode, peak)
  headmask KEY=VALUE ... -o CSV CateKV's head classification (consistent / adaptive) from a reference task
  train-policy -o FILE K=V ... train learned_mlp's eviction policy on a model and task's prompts
  data   longbench|ruler|minilongbench-to-jsonl  fetch LongBench's data.zip / RULER's essays + Punkt / MiniLongBench

`evalkv COMMAND --help` explains each command; `evalkv --version` (-V) prints the version.
"""

PRED_HELP = """usage: evalkv pred [--multirun] KEY=VALUE ...

Runs one model x method x task and appends one record per sample to <run dir>/predictions.jsonl (a killed or
interrupted run resumes where it stopped when the same command runs again). Prints the run directory last.

main keys (defaults in configs/config.yaml):
  model=NAME            a config in configs/model/ (evalkv list models); default qwen2.5-coder-0.5b-instruct
  method=NAME           an eviction method (evalkv list methods); default full
  task=NAME             a task (evalkv list tasks); default passkey
  budget=N              tokens kept per head per layer (window included), or compression_ratio=0.5
  compress=prompt|context  what the method compresses: each whole prompt (default, as the KV-cache papers), or the
                        context alone with the question fed after it (as kvpress's leaderboard); minilongbench: prompt
  task.n_samples=N      take at most N samples
  output_dir=DIR        runs go to DIR/<task>/<model>/<method>_<budget>/ (default results); or run_dir=DIR
  method.OPTION=VALUE   a method option, e.g. method.window_size=8 (options: the method's dataclass fields, in its
                        docstring; a misspelt one is refused with the list); task.OPTION=, model.OPTION= likewise
  model.device=cpu|cuda|auto  model.dtype=auto|bfloat16|float16|float32  model.attn_implementation=sdpa|eager|...
  model.device_map=auto  spread one model over the host's GPUs (also balanced, balanced_low_0, sequential)
  batch_size=N          samples whose compressed caches match decode together (default 8; 1 = one at a time)
  mlp_chunk=N           run each MLP over N prompt tokens at a time (low-memory long prefill; default off)
  decode_graphs=MODE    auto (default): decode steps replayed as CUDA graphs where the method allows, on CUDA;
                        compile: the same with a torch.compile'd step (methods with a budget; once per batch shape); off
  cache.quant=kivi2     hold what the method keeps as KIVI's 2-bit codes (kivi4: 4-bit; default none), with
                        cache.group_size=32 and cache.residual=128 exact newest entries; prompt-only methods

several GPUs, one model each (data parallel; the run's files are those of a one-process run):
  torchrun --standalone --nproc-per-node 4 -m evalkv.cli pred KEY=VALUE ...

--multirun sweeps every combination of comma-separated values; every job's config is composed and its method and
task built before the first job runs, so a bad option in any job is refused once, before a model loads.

examples:
  evalkv pred method=snapkv budget=128 task.lengths=[1024,2048]
  evalkv pred --multirun method=full,snapkv,streaming_llm budget=128
  evalkv pred model=hf model.path=meta-llama/Llama-3.1-8B-Instruct model.name=llama3.1 method=h2o budget=512

Hydra's own flags: evalkv pred --hydra-help
"""


def _hydra_arguments(args: list[str]):
    """Hydra's reading of `evalkv pred`'s arguments: its flags, and the overrides."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.prog = "evalkv pred"
    return parser.parse_args(args)


def _remove_empty_job_folder() -> None:
    """A --multirun job writes its run elsewhere: the job folder Hydra made for it (<sweep dir>/<n>) stays empty."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        folder = Path(HydraConfig.get().runtime.output_dir)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _sweep(overrides: list[str]) -> tuple[list[str], int | None]:
    """The keys a --multirun sweeps over and its number of jobs (None when Hydra's parser cannot say)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        sweeps = [override for override in parsed if override.is_sweep_override()]
        jobs = 1
        for override in sweeps:
            jobs *= len(list(override.sweep_string_iterator()))
    except Exception:  # Hydra reports a malformed override itself, in its own words
        return [], None
    return [override.key_or_group for override in sweeps], jobs


def cmd_pred(args: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in args):
        print(PRED_HELP)
        return 0
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from evalkv.config import check_jobs, register_configs
    from evalkv.paths import configs_dir
    from evalkv.run.parallel import launched_ranks
    from evalkv.run.pred import run_pred

    # Hydra's parser takes --multirun only before the overrides; accept it anywhere
    flags = [arg for arg in args if arg in ("--multirun", "-m")]
    args = [*flags, *[arg for arg in args if arg not in flags]]
    hydra_args = _hydra_arguments(args)
    if not (hydra_args.hydra_help or hydra_args.shell_completion):
        check_jobs(hydra_args.overrides, hydra_args.multirun)  # every job of a sweep, before any runs
    register_configs()
    failures: list[str] = []
    rank, world_size = launched_ranks()
    swept, jobs = _sweep(hydra_args.overrides)

    def job(cfg) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and rank == 0:
            values = [o for o in hydra_cfg.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
            print(f"evalkv pred: job {hydra_cfg.job.num + 1}/{jobs or '?'}: {' '.join(values)}", file=sys.stderr,
                  flush=True)
        try:
            run_dir = run_pred(cfg)
        except EvalkvError as error:  # a --multirun sweep goes on with its other jobs and reports at the end
            failures.append(str(error))
            print(f"evalkv pred: error: {error}", file=sys.stderr)
            if world_size > 1:  # unless other ranks wait for this one: end it, and torchrun ends them
                raise SystemExit(2) from None
            return
        except KeyboardInterrupt as stop:  # rank 0 says how far the run got; the other ranks end quietly
            if rank != 0:
                raise SystemExit(getattr(stop, "exit_code", 130)) from None
            raise
        finally:
            _remove_empty_job_folder()
        if rank == 0:  # under torchrun the run directory is printed once
            print(run_dir, flush=True)

    saved = sys.argv
    sys.argv = ["evalkv pred", *args]
    try:
        hydra.main(config_path=str(configs_dir()), config_name="config", version_base=None)(job)()
    finally:
        sys.argv = saved
    return 2 if failures else 0


def _add_resampling_options(parser: argparse.ArgumentParser) -> None:
    """The options of the bootstrap intervals and paired tests (evalkv/metrics/uncertainty.py)."""
    from evalkv.metrics.uncertainty import Resampling

    defaults = Resampling()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the intervals' and paired tests' "
                        f"resamples (default {defaults.seed}; the same seed gives the same numbers)")
    parser.add_argument("--resamples", type=int, default=defaults.resamples, help="bootstrap resamples and random "
                        f"sign flips per interval or test (default {defaults.resamples}, at least 100)")


def _resampling(options: argparse.Namespace):
    from evalkv.metrics.uncertainty import Resampling

    return Resampling(options.seed, options.resamples)


def cmd_score(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv score", description="Score run directories or predictions .jsonl files (records need task, "
        "pred, answers; all_classes and length where the metric uses them) and write scores.json next to them.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--quiet", action="store_true", help="do not print the per-task tables")
    parser.add_argument("--intervals", action="store_true", help="add each score's 95%% bootstrap interval over "
                        "samples and the minimum detectable difference (mdd) of its sample count")
    _add_resampling_options(parser)
    options = parser.parse_args(args)
    from evalkv.run.score import format_scores, interval_note, score_paths

    resampling = _resampling(options) if options.intervals else None
    outcome = score_paths(options.paths)
    for target, scores in outcome.scored:
        if not options.quiet:
            print(f"{target}\n{format_scores(scores, resampling)}\n")
    if resampling and outcome.scored and not options.quiet:
        print(interval_note(resampling))
    for run in outcome.empty:
        print(f"evalkv score: note: {run}: no records yet (the run stopped before its first sample); nothing to "
              "score", file=sys.stderr)
    for problem in outcome.unreadable:
        print(f"evalkv score: error: {problem}", file=sys.stderr)
    return 2 if outcome.unreadable else 0


def cmd_table(args: list[str]) -> int:
    from evalkv.report.table import FORMATS, table

    parser = argparse.ArgumentParser(
        prog="evalkv table", description="Aggregate every run under the paths into one table: rows model / method / "
        "budget (and query aware / agnostic when some run compressed the context without the question), columns "
        "the tasks grouped by benchmark category (LongBench's categories, RULER), each category's average, then "
        "the average over every task but perplexities (lower is better, so never averaged with scores). Missing "
        "scores show as '-' (empty in csv, null in json), never as 0; unfinished runs are named on stderr. kvpress "
        "evaluation folders (metrics.json + config.yaml, as kvpress's evaluation/evaluate.py writes them) join as rows "
        "labelled kvpress:PRESS with kvpress's own scores.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directories, kvpress evaluation folders, or "
                        "folders holding them")
    parser.add_argument("--format", default="md", choices=FORMATS)
    parser.add_argument("--view", default="scores", help="scores (default); timing (mean cost per sample); runs "
                        "(samples, invocations, interrupted ones, processes, recorded wall time); ruler "
                        "(RULER's per-length averages); longbench_e (LongBench-E's 0-4k / 4-8k / 8k+ buckets, "
                        "averaged over its tasks); leaderboard (kvpress's leaderboard columns: dataset, data_dir, "
                        "model, method, compression_ratio, score; compression-ratio and full-cache runs only); "
                        "reasoning (gsm8k, math500, aime: pass@1, maj@k, pass@k, mean new tokens, finished share); or "
                        "one metric breakdown per task such as by_context_length, by_depth, by_length, nll_by_position "
                        "(perplexity: mean NLL per position bucket), ppl_by_position, longgenbench "
                        "(longgenbench_gsm8k: questions answered, correct, accuracy over all questions)")
    parser.add_argument("--delta", action="store_true", help="show every row but the full cache's as its "
                        "difference from the full-cache row of the same model")
    parser.add_argument("--intervals", action="store_true", help="scores view: each cell with its 95%% bootstrap "
                        "interval over samples (averages stratified by task); with --delta, each difference with "
                        "the interval of the paired difference on the samples both rows have and * where the "
                        "sign-flip test gives p < 0.05 (csv and json: COLUMN_low, COLUMN_high, COLUMN_p, "
                        "COLUMN_mdd columns)")
    _add_resampling_options(parser)
    parser.add_argument("-o", "--output", help="write the table to this file instead of stdout")
    options = parser.parse_args(args)
    warnings: list[str] = []
    if options.intervals:
        from evalkv.report.intervals import interval_table

        if options.view != "scores":
            raise EvalkvError(f"--intervals applies to the scores view (its tasks, categories and average), not to "
                              f"--view {options.view}; leave out --view or --intervals")
        text = interval_table(options.paths, options.format, options.delta, warnings, _resampling(options))
    elif options.view == "leaderboard":
        from evalkv.report.leaderboard import leaderboard

        if options.delta:
            raise EvalkvError("--delta does not apply to the leaderboard view (it lists scores as kvpress's "
                              "leaderboard does); use it with the scores view")
        text = leaderboard(options.paths, options.format, warnings)
    else:
        text = table(options.paths, options.format, options.view, options.delta, warnings)
    for warning in warnings:
        print(f"evalkv table: note: {warning}", file=sys.stderr)
    if options.output:
        from evalkv.records import write_text_atomic

        write_text_atomic(Path(options.output), text)
    else:
        print(text, end="")
    return 0


PLOT_EPILOG = """examples:
  evalkv plot curves results/ -o curves.png
  evalkv plot needle results/needle/*/snapkv_128 -o needle.pdf
  evalkv plot pattern model=random-tiny-llama method=snapkv budget=64 task.lengths=[512] -o pattern.png
  evalkv plot pattern results/passkey/qwen2.5-coder-0.5b-instruct/snapkv_128 --sample ID --step 1 -o pattern.png
  evalkv plot position results/perplexity* -o nll.png
"""


def cmd_plot(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv plot", epilog=PLOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plot runs into a PNG or PDF file (the suffix of -o picks the format).")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="curves|needle|pattern|position")
    curves = kinds.add_parser(
        "curves", help="score versus budget or compression ratio per method, one panel per task and the average",
        description="Score versus budget (log2 axis) or compression ratio (linear, 0 to 1) for every method of the "
        "runs under the paths, one panel per task plus the average, the full cache as a dashed line; every line is "
        "named at its right end and drawn in a shaded band of its scores' 95%% bootstrap intervals over samples "
        "(the average's stratified by task). Runs with budgets and runs with compression ratios get a row of "
        "panels each.")
    curves.add_argument("paths", nargs="+", metavar="PATH", help="run directories or folders of runs")
    curves.add_argument("-o", "--output", default="curves.png", help="PNG or PDF file (default curves.png)")
    curves.add_argument("--tasks", help="comma-separated columns to plot: tasks, categories (e.g. RULER) or "
                        "average (default: every task and the average)")
    curves.add_argument("--title")
    curves.add_argument("--no-bands", action="store_true", help="leave out the 95%% bootstrap bands around the lines")
    _add_resampling_options(curves)
    needle = kinds.add_parser(
        "needle", help="the needle-in-a-haystack heatmap (depth x context length) of runs",
        description="The needle-in-a-haystack heatmap (rows depth percent, columns context length, cells mean "
        "needle recall 0-1 with KVCache-Factory's colours); several runs stack.")
    needle.add_argument("paths", nargs="+", metavar="RUN", help="run directories or predictions .jsonl files")
    needle.add_argument("-o", "--output", default="needle_heatmap.png", help="PNG or PDF file "
                        "(default needle_heatmap.png)")
    needle.add_argument("--title", help="title above each heatmap (default: Needle In A Haystack)")
    pattern = kinds.add_parser(
        "pattern", help="which positions each layer and head kept for one sample (recomputed)",
        description="Recompute one sample with the engine's trace and draw which positions each layer and KV head "
        "held at a decode step (step 1: what the prompt's compression kept). The run is a run directory (its "
        "config.yaml) or evalkv pred overrides (model=, method=, budget=, task=, task.X=, method.X=).")
    pattern.add_argument("run", nargs="+", metavar="RUN|KEY=VALUE")
    pattern.add_argument("--sample", help="the sample id (a record's id; default: the task's first sample)")
    pattern.add_argument("--step", type=int, default=1, help="decode step whose cache is drawn (default 1)")
    pattern.add_argument("-o", "--output", default="pattern.png", help="PNG or PDF file (default pattern.png)")
    pattern.add_argument("--title")
    position = kinds.add_parser(
        "position", help="perplexity runs: mean NLL (or PPL) versus position in the text, one line per method",
        description="The mean NLL per position bucket of the perplexity runs under the paths (evalkv table --view "
        "nll_by_position), one panel per text source, one line per method and budget, the full cache dashed.")
    position.add_argument("paths", nargs="+", metavar="PATH", help="run directories or folders of runs")
    position.add_argument("-o", "--output", default="nll_by_position.png", help="PNG or PDF file "
                          "(default nll_by_position.png)")
    position.add_argument("--ppl", action="store_true", help="plot the PPL per bucket instead of the mean NLL")
    position.add_argument("--title")
    options = parser.parse_args(args)
    if options.kind == "position":
        from evalkv.report.position import plot_positions
        from evalkv.report.runs import load_runs
        from evalkv.report.table import build_table

        view = "ppl_by_position" if options.ppl else "nll_by_position"
        skipped: list[str] = []
        runs = load_runs(options.paths, skipped)
        for warning in skipped:
            print(f"evalkv plot: note: {warning}", file=sys.stderr)
        print(plot_positions(build_table(runs, view), options.output, view, options.title))
    elif options.kind == "needle":
        from evalkv.report.heatmap import plot_needle

        print(plot_needle(options.paths, options.output, options.title))
    elif options.kind == "curves":
        from evalkv.report.curves import plot_curves
        from evalkv.report.runs import load_runs
        from evalkv.report.table import build_table

        tasks = [task for task in (options.tasks or "").split(",") if task]
        skipped: list[str] = []
        runs = load_runs(options.paths, skipped)
        for warning in skipped:
            print(f"evalkv plot: note: {warning}", file=sys.stderr)
        frame = build_table(runs)
        bands = None
        if not options.no_bands:
            from evalkv.report.intervals import interval_bounds

            bounds = interval_bounds(runs, frame, _resampling(options))
            bands = (bounds.low, bounds.high)
            for note in bounds.notes:
                print(f"evalkv plot: note: {note}", file=sys.stderr)
        print(plot_curves(frame, options.output, tasks, options.title, bands))
    else:
        from evalkv.report.pattern import plot_pattern
        from evalkv.run.pattern import eviction_pattern, pattern_config

        found = eviction_pattern(pattern_config(options.run), options.sample, options.step)
        print(plot_pattern(found, options.output, options.title))
    return 0


def cmd_report(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv report", description="Write one self-contained static HTML page (no external files) with the "
        "tables (scores by category with 95%% bootstrap intervals, differences from the full cache with paired "
        "intervals, sign-flip p-values and minimum detectable differences, RULER / LongBench-E views, cost per "
        "sample) and plots (score versus budget with bands, needle heatmaps) of every run under the paths, and the "
        "list of runs.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directories or folders of runs")
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file (default report.html)")
    parser.add_argument("--title", help="the page's title (default: evalkv report: PATHS)")
    _add_resampling_options(parser)
    options = parser.parse_args(args)
    from evalkv.report.page import build_report

    print(build_report(options.paths, options.output, options.title, _resampling(options)))
    return 0


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def _yaml_rows(group: str, exclude=()) -> list[tuple[str, str]]:
    """(name, the file's first comment line) for each yaml config of the group (model configs, method variants)."""
    from evalkv.paths import configs_dir

    rows = []
    for path in sorted((configs_dir() / group).glob("*.yaml"), key=lambda path: path.stem):
        if path.stem not in exclude:
            rows.append((path.stem, path.read_text().splitlines()[0].lstrip("# ").strip()))
    return rows


def cmd_list(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv list", description="List registered names (plug-ins included), one per line: the first token of "
        "each line is the name, then its description. A method's presets (registered names that only change its "
        "defaults, e.g. OBCache's reference tags) are listed on its line.")
    parser.add_argument("what", choices=("methods", "tasks", "models"))
    what = parser.parse_args(args).what
    if what == "models":
        rows = _yaml_rows("model")
    else:
        if what == "methods":
            from evalkv.methods.registry import REGISTRY
        else:
            from evalkv.tasks.registry import REGISTRY
        rows = []
        for name in REGISTRY.names():
            if REGISTRY.preset_of.get(name) in REGISTRY.classes:
                continue  # on its base's line
            description = _first_line(REGISTRY.classes[name].__doc__)
            if REGISTRY.presets(name):
                description = f"{description} Presets: {', '.join(REGISTRY.presets(name))}."
            rows.append((name, description))
        rows += _yaml_rows(what[:-1], exclude=REGISTRY.classes)
        rows.sort()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name.ljust(width)}  {description}".rstrip())
    return 0


DEMO_EPILOG = """KEY=VALUE overrides are evalkv pred's (the task is passkey, the methods full, snapkv and
streaming_llm): model=, model.X=, budget= or compression_ratio=, task.X= (passkey's options), method.X= (every demo
method that has option X), snapkv.X= (one method), output_dir=, batch_size=, mlp_chunk=, decode_graphs=, progress=.
The flags are shorthands: --budget N is budget=N, --lengths A,B is task.lengths=[A,B], --depths task.depths=[...],
--output-dir output_dir=.

examples:
  evalkv demo
  evalkv demo budget=64 task.lengths=[1024,2048]
  evalkv demo model=random-tiny-llama model.device=cpu task.lengths=[256] task.depths=[50]
"""


def cmd_demo(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv demo", epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Passkey retrieval on the embedded model (Qwen2.5-Coder-0.5B-Instruct): full cache vs SnapKV vs "
        "StreamingLLM at one budget, scored and printed as a table.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--output-dir", help="where the runs go (default results/demo)")
    parser.add_argument("--budget", help="tokens kept per head per layer (default 128)")
    parser.add_argument("--lengths", help="comma-separated prompt lengths in tokens (default 1024)")
    parser.add_argument("--depths", help="comma-separated key depths in percent (default 0,25,50,75,100)")
    options = parser.parse_intermixed_args(args)
    from evalkv.run.demo import demo_configs, run_demo

    flags = {"output_dir": options.output_dir, "budget": options.budget,
             "task.lengths": options.lengths and f"[{options.lengths}]",
             "task.depths": options.depths and f"[{options.depths}]"}
    shorthands = [f"{key}={value}" for key, value in flags.items() if value is not None]
    print(run_demo(demo_configs([*shorthands, *options.overrides])), end="")
    return 0


BENCH_EPILOG = """KEY=VALUE overrides are evalkv pred's, for several methods at once:
  model=NAME  model.X=VALUE      the model (default random-llama-3.1-8b) and its options, e.g. model.dtype=bfloat16
  method=A,B                     the methods compared, as --methods A,B (default full,snapkv; snapkv with --workload)
  budget=N  compression_ratio=R  every method's budget (default budget=1024; full keeps everything)
  method.X=VALUE                 option X of every listed method that has it (an error when none has it)
  A.X=VALUE                      option X of method A alone, e.g. snapkv.window_size=8
  cache.quant=kivi2  cache.X=V   every method holds its cache as KIVI codes (grid only; rows read snapkv+kivi2)
The older flags still work: --model M is model=M, --model-option X=V is model.X=V, --budget N is budget=N,
--option A.X=V is A.X=V.

examples:
  evalkv bench model=random-llama-3.1-8b method=full,snapkv budget=1024 snapkv.window_size=8 --lengths 8192
  evalkv bench method=snapkv budget=2048 --lengths 8192 --batch-sizes 1,16 --decode-graphs off,auto
  evalkv bench --workload longbench method=snapkv budget=1024 --batch-size 8 --write-workload workload.json
  evalkv bench --workload reasoning method=snapkv budget=1024 --samples 64 --new-tokens 8192 --batch-size 8
  evalkv bench --questions 8 method=full,snapkv budget=1024 --lengths 32768
  evalkv bench method=full,snapkv cache.quant=kivi2 --lengths 32768 --new-tokens 8
"""
BENCH_MODEL = "random-llama-3.1-8b"
BENCH_BUDGET = 1024


def _bench_overrides(options: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The methods and the overrides of `evalkv bench`'s arguments: the older flags as overrides, `method=A,B` (or
    --methods) as the method list, the default model and budget where none is given."""
    from evalkv.overrides import parse

    aliases = [*([f"model={options.model}"] if options.model else []),
               *(f"model.{option}" for option in options.model_option),
               *([f"budget={options.budget}"] if options.budget else []), *options.option]
    overrides, names = [], options.methods.split(",") if options.methods else []
    for override in parse([*aliases, *options.overrides]):
        if override.key_or_group != "method":
            overrides.append(override.input_line)
        elif options.methods:
            raise EvalkvError(f"{override.input_line} and --methods {options.methods}: give the methods once")
        else:
            names = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    keys = {text.partition("=")[0] for text in overrides}
    defaults = ([] if "model" in keys else [f"model={BENCH_MODEL}"]) + (
        [] if keys & {"budget", "compression_ratio"} else [f"budget={BENCH_BUDGET}"])
    names = [name for name in names if name] or (["snapkv"] if options.workload else ["full", "snapkv"])
    return names, [*defaults, *overrides]


def _bench_settings(cfg) -> tuple[str, dict]:
    """A composed method as bench runs and records it: its name and options, the budget only where it needs one."""
    from evalkv.config import options as group_options
    from evalkv.methods import build_method

    values = group_options(cfg.method)
    needs_budget = build_method(cfg.method.name, values).requires_budget()
    return cfg.method.name, {key: value for key, value in values.items()
                             if key not in ("budget", "compression_ratio") or (needs_budget and value is not None)}


def cmd_bench(args: list[str]) -> int:
    from evalkv.run.workload import (
        DEFAULT_MAX_LENGTH,
        DEFAULT_MIN_LENGTH,
        REASONING_MAX_LENGTH,
        REASONING_MIN_LENGTH,
        REASONING_NEW_TOKENS,
        REASONING_SAMPLES,
        WORKLOADS,
    )

    parser = argparse.ArgumentParser(
        prog="evalkv bench", epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure prefill time, eviction overhead (vs the full cache), decode "
        "tokens/s, time to first token, peak GPU memory and KV bytes held, per method and context length. Prompts "
        "are random token ids and generation has a fixed length (EOS ignored): a random-weight architecture "
        "(e.g. model=random-llama-3.1-8b) measures speed and memory honestly. of_bound is the decode step's "
        "HBM-bandwidth bound (weight bytes over the measured copy bandwidth) over its time; of_bound_kv counts the "
        "KV bytes a step reads too. With --workload longbench, time a whole LongBench-shaped workload end to end "
        "instead (lengths from LongBench's per-task length distribution, each task's max new tokens; "
        "evalkv/run/workload.py); with --workload reasoning, a reasoning-shaped one (short prompts, long "
        "generations). A workload's table puts its physical floor beside the wall time: prefill FLOPs over the "
        "measured peak matmul rate plus decode bytes (weights once a step per batch, every sample's KV) over the "
        "copy bandwidth, at --batch-size (evalkv/run/floor.py); of_floor is floor over wall time. With "
        "--questions N, time N questions about one context answered from one compression of it versus compressing "
        "it again for each question (compress=context's shared contexts).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model=, model.X=, method=A,B, budget=, "
                        "compression_ratio=, method.X=, A.X= (below)")
    parser.add_argument("--methods", help="comma-separated method names, as method=A,B")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--model-option", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--lengths", help="comma-separated context lengths (default 8192,32768)")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes: prompts per run, decoded together "
                        "where the method allows (default 1)")
    parser.add_argument("--mlp-chunk", type=int, help="run the MLP over at most this many prompt tokens at a time "
                        "(low-memory long prefill)")
    parser.add_argument("--decode-graphs", default="auto", help="comma-separated decode_graphs modes to compare: "
                        "auto (CUDA graphs where the method allows, on CUDA), compile (graphs of a torch.compile'd "
                        "step; the warm-up run compiles), off, eager (default auto)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per run (EOS ignored; default 64), or per "
                        f"sample of --workload reasoning (default {REASONING_NEW_TOKENS})")
    parser.add_argument("--repeats", type=int, help="timed runs (default 3; 1 with --workload)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("-o", "--output", help="write the JSON report here")
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of one run of the first method and length")
    workload_args = parser.add_argument_group("workload", "time a whole workload end to end instead of the grid (the "
                                          "options after --workload need it)")
    workload_args.add_argument("--workload", choices=WORKLOADS, help="longbench: LongBench-shaped, every sample "
                               "generates its task's max new tokens; reasoning: prompt lengths uniform in "
                               "[--min-length, --max-length], each generating --new-tokens (EOS ignored in both)")
    workload_args.add_argument("--samples-per-task", type=int, help="longbench: samples of each of LongBench's 16 "
                               "English tasks (default 4)")
    workload_args.add_argument("--samples", type=int, help=f"reasoning: samples (default {REASONING_SAMPLES})")
    workload_args.add_argument("--min-length", type=int, help=f"shortest prompt (default {DEFAULT_MIN_LENGTH} for "
                               f"longbench, {REASONING_MIN_LENGTH} for reasoning)")
    workload_args.add_argument("--max-length", type=int, help="longest prompt: longbench's longer draws are clipped, "
                               f"as LongBench truncates (default {DEFAULT_MAX_LENGTH} for longbench, "
                               f"{REASONING_MAX_LENGTH} for reasoning)")
    workload_args.add_argument("--seed", type=int, help="the workload's seed (default 0)")
    workload_args.add_argument("--workload-file", metavar="PATH", help="run this workload file instead of drawing "
                               "one (written by --write-workload)")
    workload_args.add_argument("--write-workload", metavar="PATH", help="save the workload with the model's config "
                               "and the methods' settings (what scripts/kvpress_bench.py reads)")
    workload_args.add_argument("--batch-size", type=int, help="samples per Engine.generate_batch call, as "
                               "evalkv pred's batch_size= (default 8)")
    question_args = parser.add_argument_group(
        "questions", "time questions about one context (--lengths, --new-tokens, --repeats apply too) instead of the "
        "grid: answered from one compression of the context, and with the context compressed again for each")
    question_args.add_argument("--questions", type=int, help="questions about each context (at least 2)")
    question_args.add_argument("--question-tokens", type=int, help="tokens of each question (default 32)")
    options = parser.parse_intermixed_args(args)
    _check_bench_arguments(options)
    from evalkv.config import compose_methods, model_config
    from evalkv.config import quantization as group_quantization
    from evalkv.models.loader import load_model
    from evalkv.overrides import Dialect

    names, overrides = _bench_overrides(options)
    dialect = Dialect("bench", ("model", "model.", "method", "method.", "budget", "compression_ratio", "cache."),
                      "its prompts are random; A.X=VALUE sets option X of method A alone")
    configs = compose_methods(names, overrides, dialect)
    methods = [_bench_settings(cfg) for cfg in configs]
    quantization = group_quantization(configs[0].cache)
    if quantization is not None and _bench_mode(options) != "grid":
        raise EvalkvError(f"cache.quant={configs[0].cache.quant} is timed by the length x batch-size grid (without "
                          "--workload or --questions)")
    model = load_model(model_config(configs[0]))
    graph_modes = _graph_modes(options)
    if options.workload:
        report, table = _bench_workload(options, configs[0].model.name, model, methods, graph_modes)
    elif options.questions is not None:
        report, table = _bench_questions(options, model, methods, graph_modes)
    else:
        report, table = _bench_grid(options, model, methods, graph_modes, quantization)
    if options.output:
        from evalkv.records import write_json_atomic

        write_json_atomic(Path(options.output), report)
    print(f"{report['device']}, {report['model']}; {report['note']}\n{table}", end="")
    return 0


# The options of each mode of evalkv bench (the others are refused there); shared ones are in no list.
_WORKLOAD_OPTIONS = ("min_length", "max_length", "seed", "workload_file", "write_workload", "batch_size")
_MODE_OPTIONS = {
    "grid": ("lengths", "batch_sizes", "new_tokens", "profile"),
    "longbench": ("samples_per_task", *_WORKLOAD_OPTIONS),
    "reasoning": ("samples", "new_tokens", *_WORKLOAD_OPTIONS),
    "questions": ("questions", "question_tokens", "lengths", "new_tokens"),
}
_MODE_NAMES = {"grid": "the length x batch-size grid (without --workload or --questions)",
               "longbench": "--workload longbench", "reasoning": "--workload reasoning", "questions": "--questions"}
# Options that draw a workload, which --workload-file replaces.
_DRAWN_OPTIONS = ("samples_per_task", "samples", "new_tokens", "min_length", "max_length", "seed")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bench_mode(options: argparse.Namespace) -> str:
    if options.workload and options.questions is not None:
        raise EvalkvError("--workload and --questions are two modes of evalkv bench; give one")
    return options.workload or ("questions" if options.questions is not None else "grid")


def _check_bench_arguments(options: argparse.Namespace) -> None:
    """Options of the other modes are refused rather than silently ignored."""
    mode = _bench_mode(options)
    if mode == "longbench" and options.new_tokens is not None:
        raise EvalkvError("--new-tokens cannot be used with --workload longbench: each sample generates its task's "
                          "max new tokens (LongBench's dataset2maxlen); --workload reasoning takes --new-tokens")
    others = {name for names in _MODE_OPTIONS.values() for name in names} - set(_MODE_OPTIONS[mode])
    given = [name for name in sorted(others) if getattr(options, name) not in (None, False)]
    if given:
        raise EvalkvError(f"{', '.join(map(_flag, given))} cannot be used with {_MODE_NAMES[mode]}; see "
                          "evalkv bench --help")
    if options.workload_file:
        drawn = [name for name in _DRAWN_OPTIONS if getattr(options, name) is not None]
        if drawn:
            raise EvalkvError(f"{', '.join(map(_flag, drawn))}: the workload comes from --workload-file "
                              f"{options.workload_file}; leave them out")
    for name in ("batch_size", "samples_per_task", "samples", "new_tokens", "repeats", "question_tokens"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise EvalkvError(f"{_flag(name)} must be at least 1, got {getattr(options, name)}")
    if options.questions is not None and options.questions < 2:
        raise EvalkvError(f"--questions must be at least 2 (one question has nothing to share), got "
                          f"{options.questions}")
    from evalkv.kv.engine import check_decode_graphs

    for graphs in _graph_modes(options) or [""]:
        check_decode_graphs(graphs)


def _graph_modes(options: argparse.Namespace) -> list[str]:
    return [mode for mode in options.decode_graphs.split(",") if mode]


def _bench_lengths(options: argparse.Namespace) -> tuple[list[int], int]:
    """--lengths and --new-tokens with their defaults (8192,32768 and 64)."""
    lengths = [int(x) for x in (options.lengths or "8192,32768").split(",") if x]
    return lengths, 64 if options.new_tokens is None else options.new_tokens


def _bench_grid(options, model, methods, graph_modes, quantization=None) -> tuple[dict, str]:
    from evalkv.run.bench import format_rows, profile_once, run_bench

    lengths, new_tokens = _bench_lengths(options)
    if options.profile:
        print(profile_once(model, methods[0], lengths[0], new_tokens))
    batch_sizes = [int(x) for x in (options.batch_sizes or "1").split(",") if x]
    if not batch_sizes or min(batch_sizes) < 1:
        raise EvalkvError(f"--batch-sizes must be positive integers, got {options.batch_sizes!r}")
    report = run_bench(model, methods, lengths, new_tokens, options.repeats or 3, options.warmup,
                       batch_sizes=batch_sizes, mlp_chunk=options.mlp_chunk, decode_graphs=graph_modes,
                       quantization=quantization)
    return report, format_rows(report)


def _bench_questions(options, model, methods, graph_modes) -> tuple[dict, str]:
    from evalkv.run.bench import format_questions_rows, run_questions_bench

    lengths, new_tokens = _bench_lengths(options)
    report = run_questions_bench(model, methods, lengths, options.questions, options.question_tokens or 32, new_tokens,
                                 options.repeats or 3, options.warmup, mlp_chunk=options.mlp_chunk,
                                 decode_graphs=graph_modes)
    return report, format_questions_rows(report)


def _workload_method_settings(methods: list[tuple[str, dict]]) -> dict:
    """Each method's settings that scripts/kvpress_bench.py mirrors: the budget and SnapKV's window, and the
    decoding-time cuts (`decode_interval`, `decode_target`, `decode_buffer`) of a method that cuts while decoding."""
    from evalkv.methods import build_method

    settings = {}
    for name, method_options in methods:
        method = build_method(name, method_options)
        keys = ("budget", "window_size", "kernel_size", "pooling")
        if getattr(method, "decode_interval", None) is not None:
            keys += ("decode_interval", "decode_target", "decode_buffer")
        settings[name] = {key: getattr(method, key) for key in keys if hasattr(method, key)}
    return settings


def _bench_workload(options, model_name, model, methods, graph_modes) -> tuple[dict, str]:
    import json

    from evalkv.run.bench import format_workload_rows, run_workload_bench, weight_bytes
    from evalkv.run.workload import (
        DEFAULT_MAX_LENGTH,
        DEFAULT_MIN_LENGTH,
        REASONING_MAX_LENGTH,
        REASONING_MIN_LENGTH,
        REASONING_NEW_TOKENS,
        REASONING_SAMPLES,
        build_reasoning_workload,
        build_workload,
        read_workload,
        write_workload,
    )

    vocab_size = model.model.config.vocab_size
    seed = 0 if options.seed is None else options.seed
    if options.workload_file:
        workload = read_workload(Path(options.workload_file))
        if workload.get("workload") != options.workload:
            raise EvalkvError(f"{options.workload_file} holds a {workload.get('workload')} workload, not "
                              f"{options.workload}; give --workload {workload.get('workload')}")
        if workload["vocab_size"] > vocab_size:
            raise EvalkvError(f"{options.workload_file}: ids up to {workload['vocab_size'] - 1}, but model "
                              f"{model_name} has {vocab_size} tokens")
    elif options.workload == "reasoning":
        workload = build_reasoning_workload(
            vocab_size, options.samples or REASONING_SAMPLES, options.new_tokens or REASONING_NEW_TOKENS, seed,
            options.min_length or REASONING_MIN_LENGTH, options.max_length or REASONING_MAX_LENGTH)
    else:
        workload = build_workload(vocab_size, options.samples_per_task or 4, seed,
                                  options.min_length or DEFAULT_MIN_LENGTH, options.max_length or DEFAULT_MAX_LENGTH)
    if options.write_workload:
        # What scripts/kvpress_bench.py needs to run the same prompts on the same architecture and budget.
        workload["model"] = {
            "name": model_name, "description": model.description,
            "dtype": str(model.model.dtype).removeprefix("torch."),
            "config": json.loads(model.model.config.to_json_string()),
            "num_parameters": sum(p.numel() for p in model.model.parameters()),
            "weight_bytes": weight_bytes(model.model),
        }
        workload["evalkv"] = {"methods": _workload_method_settings(methods)}
        write_workload(Path(options.write_workload), workload)
    report = run_workload_bench(model, methods, workload, options.batch_size or 8, options.repeats or 1,
                                options.warmup, options.mlp_chunk, graph_modes)
    return report, format_workload_rows(report)


HEADMASK_DEFAULTS = ["task=ruler", "task.tasks=[vt]", "task.lengths=[16384]"]


def cmd_headmask(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="evalkv headmask", description="CateKV's offline head classification (docs/methods.md#catekv): run a "
        "reference task with the full cache, measure each layer's KV heads' consistency (CV of per-chunk hit "
        "counts of the last prompt queries), and write a CSV (one row per layer, one 0/1 column per KV head; "
        "1 = adaptive, kept full) for `method=catekv method.headmask_path=...`. Overrides pick the model and task "
        f"as in evalkv pred (default: {' '.join(HEADMASK_DEFAULTS)}; the reference uses 128K-token vt samples).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model=..., task=..., task.X=...")
    parser.add_argument("-o", "--output", required=True, help="the headmask CSV to write (+ .json with details)")
    parser.add_argument("--samples", type=int, default=50, help="reference samples (reference: 50)")
    parser.add_argument("--cv-threshold", type=float, default=0.4, help="share of heads made adaptive (ref. 0.4)")
    parser.add_argument("--top-fraction", type=float, default=0.998, help="quantile setting the hit level")
    parser.add_argument("--top-threshold", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--init-tokens", type=int, default=64)
    parser.add_argument("--recent-tokens", type=int, default=256)
    parser.add_argument("--last-q", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="seed of the draw of sample matrices (reference: 42)")
    options = parser.parse_intermixed_args(args)
    from evalkv.config import build_run, compose_run
    from evalkv.models.loader import load_model
    from evalkv.overrides import Dialect
    from evalkv.run.headmask import ConsistencyProbe, build_headmask, static_headmask, write_headmask

    if not 0 < options.cv_threshold < 1 or options.samples < 1:
        raise EvalkvError("headmask: --cv-threshold must be in (0, 1) and --samples >= 1")
    overrides = options.overrides if any(o.startswith("task=") for o in options.overrides) else [
        *HEADMASK_DEFAULTS, *options.overrides]
    dialect = Dialect("headmask", ("model", "model.", "task", "task."), "its probe runs the full cache")
    run = build_run(compose_run(overrides, dialect))
    model = load_model(run.model)
    task = run.task
    probe = ConsistencyProbe(chunk_size=options.chunk_size, init_tokens=options.init_tokens,
                             recent_tokens=options.recent_tokens, last_q=options.last_q,
                             top_fraction=options.top_fraction, top_threshold=options.top_threshold)
    matrices = build_headmask(model, task, options.samples, probe)
    mask = static_headmask(matrices, options.cv_threshold, seed=options.seed)
    metadata = {"model": model.description, "task": task.name, "overrides": overrides,
                "samples": len(matrices), **{k: v for k, v in vars(options).items() if k not in ("overrides",)}}
    write_headmask(Path(options.output), mask, metadata, matrices)
    print(f"{options.output}: {int(mask.sum())} of {mask.numel()} heads adaptive ({len(matrices)} samples)")
    return 0


TRAIN_POLICY_EPILOG = """KEY=VALUE overrides pick the model and the training prompts as in evalkv pred (model=,
task=, task.X=, model.X=, task.n_samples=); the model runs with the full cache. A task with a `seed` option
(passkey) gets task.seed=1729 unless one is given, so training prompts differ from the evaluation's (passkey's
default seed is 42); for other tasks choose data disjoint from what you evaluate on. The policy file records the
task config it was trained on. Use it with: evalkv pred method=learned_mlp method.policy_path=FILE budget=128

examples:
  evalkv train-policy task.lengths=[1024,2048] task.samples_per_cell=4 -o policies/qwen-passkey.safetensors
  evalkv train-policy model=llama3.1-8b-instruct task.n_samples=40 --steps 64 --top 256 -o llama.safetensors
"""


def cmd_train_policy(args: list[str]) -> int:
    from evalkv.run.train_policy import TrainingOptions, compose_config, train_policy

    defaults = TrainingOptions()
    parser = argparse.ArgumentParser(
        prog="evalkv train-policy", epilog=TRAIN_POLICY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the learned_mlp eviction policy: run a model with the full cache on a task's prompts, "
        "record the attention each prompt token receives from the next --steps generated tokens, label the --top "
        "most attended per layer and KV head, fit one small MLP per layer and KV head (BCE, Adam, fixed seed) and "
        "write it as safetensors with JSON metadata.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("-o", "--output", required=True, help="the policy file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="decode steps observed per prompt")
    parser.add_argument("--top", type=int, default=defaults.top, help="tokens labelled 1 per layer and KV head")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--hidden", default=",".join(map(str, defaults.hidden)), help="hidden layer sizes")
    parser.add_argument("--features", default=",".join(defaults.features),
                        help="comma-separated subset of key, log_position, value_norm")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and shuffling seed")
    parser.add_argument("--holdout", type=float, default=defaults.holdout,
                        help="share of the prompts held out to report the policy's ranking quality")
    options = parser.parse_intermixed_args(args)
    try:
        hidden = [int(size) for size in options.hidden.split(",") if size]
    except ValueError:
        raise EvalkvError(f"--hidden must be comma-separated integers, got {options.hidden!r}") from None
    training = TrainingOptions(
        steps=options.steps, top=options.top, epochs=options.epochs, hidden=hidden, lr=options.lr,
        features=[name for name in options.features.split(",") if name], batch_size=options.batch_size,
        seed=options.seed, holdout=options.holdout,
    )
    metadata = train_policy(compose_config(options.overrides), options.output, training)
    report = metadata["training"]
    print(f"trained on {report['prompts']} prompts ({report['tokens_per_head']} tokens per head) of "
          f"{metadata['model_config']}; final loss {report['final_loss']}")
    if "held_out_top_overlap" in report:
        print(f"held-out prompts: the policy's top {training.top} recovers {report['held_out_top_overlap']:.1%} of "
              f"the most attended tokens (chance {report['chance_top_overlap']:.1%})")
    print(options.output)
    return 0



def cmd_data(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="evalkv data", description="Fetch or convert benchmark data.")
    kinds = parser.add_subparsers(dest="what", required=True, metavar="longbench|ruler|minilongbench-to-jsonl")
    longbench = kinds.add_parser(
        "longbench", help="download LongBench's data.zip from the hub and unpack it",
        description="Download LongBench's data.zip from the hub (THUDM/LongBench, now zai-org/LongBench), or take "
        "a local copy, check every file's row count, and unpack {task}.jsonl and {task}_e.jsonl into DEST "
        "(use it as task.data_dir). Nothing is written unless every file checks out.")
    longbench.add_argument("--dest", default="data/longbench", help="where the files go (default data/longbench)")
    longbench.add_argument("--from-archive", metavar="PATH", help="a data.zip already downloaded (works offline)")
    ruler = kinds.add_parser(
        "ruler", help="fetch RULER's essay haystack and NLTK's Punkt (the essay niah tasks need both)",
        description="Put RULER's PaulGrahamEssays.json into DEST (downloaded, or copied from --essays; either way "
        "checked against the published file's sha256) and make NLTK's English Punkt model (punkt_tab) available "
        "(kept where NLTK finds it, else downloaded into --nltk-data). Then run with task.essay_path=DEST/"
        "PaulGrahamEssays.json.")
    ruler.add_argument("--dest", default="data/ruler", help="where the essays go (default data/ruler)")
    ruler.add_argument("--essays", metavar="PATH", help="a PaulGrahamEssays.json already downloaded (works offline)")
    ruler.add_argument("--nltk-data", metavar="DIR", help="where Punkt goes if NLTK does not find it (default: "
                       "NLTK's download folder, ~/nltk_data); a folder NLTK does not search must be named by NLTK_DATA")
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
    elif options.what == "ruler":
        from evalkv.tasks.ruler.data import fetch_essays, fetch_punkt

        essays, essays_from = fetch_essays(Path(options.dest), Path(options.essays) if options.essays else None)
        punkt, punkt_from = fetch_punkt(Path(options.nltk_data) if options.nltk_data else None)
        print(f"NLTK Punkt (punkt_tab): {punkt} ({punkt_from})")
        print(f"RULER's essays ({essays_from}), for task.essay_path:")
        print(essays)
    else:
        import json

        from evalkv.records import write_text_atomic
        from evalkv.tasks.longbench.data import minilongbench_records

        records = minilongbench_records(Path(options.source))
        write_text_atomic(Path(options.output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"{len(records)} records over {len({r['task'] for r in records})} tasks")
        print(options.output)
    return 0


COMMANDS = {
    "pred": cmd_pred, "score": cmd_score, "table": cmd_table, "plot": cmd_plot, "report": cmd_report,
    "list": cmd_list, "demo": cmd_demo,
    "data": cmd_data, "bench": cmd_bench, "headmask": cmd_headmask, "train-policy": cmd_train_policy,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evalkv")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        import evalkv

        return evalkv.__version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"evalkv {_version()}")
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
    except KeyboardInterrupt as stop:  # Ctrl-C; evalkv pred's own (also SIGTERM) says how far the run got
        print(f"evalkv {command}: {stop or 'interrupted'}", file=sys.stderr)
        return getattr(stop, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
