"""Error bars and paired tests (evalkv/metrics/uncertainty.py): bootstrap intervals against enumerated bootstrap
distributions and an independent draw of the documented resamples, stratification by task, the sign-flip test
against known answers and scipy, the minimum detectable difference, and where the commands show them."""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections import Counter
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from report_runs import longbench, make_run
from scipy import stats

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.metrics.uncertainty import (
    MDD_FACTOR,
    PairedRow,
    Resampling,
    RowReplicates,
    Samples,
    paired_differences,
    run_mdd,
    sign_flip_p,
    task_samples,
)
from evalkv.report import curves

RESAMPLING = Resampling(seed=0, resamples=2000)


def _samples(scores, ids=None) -> Samples:
    return Samples(tuple(ids or (str(i) for i in range(len(scores)))), np.asarray(scores, dtype=float))


def _resample_distribution(scores: list[int]) -> Counter:
    """The exact bootstrap distribution of 100 x the mean: every ordered resample of n from n, equally likely."""
    n = len(scores)
    return Counter({Fraction(100 * total, n): Fraction(count, n ** n) for total, count in Counter(
        sum(draw) for draw in itertools.product(scores, repeat=n)).items()})


def _mean_of(first: Counter, second: Counter) -> Counter:
    """The distribution of (X + Y) / 2 for independent X, Y."""
    result: Counter = Counter()
    for (x, p), (y, q) in itertools.product(first.items(), second.items()):
        result[(x + y) / 2] += p * q
    return result


def _quantile(distribution: Counter, level: Fraction) -> float:
    """The smallest value whose cumulative probability reaches the level."""
    cumulative = Fraction(0)
    for value in sorted(distribution):
        cumulative += distribution[value]
        if cumulative >= level:
            return float(value)
    raise AssertionError("probabilities do not sum to 1")


def _assert_percentiles_of(interval: tuple[float, float], distribution: Counter) -> None:
    """The interval's ends are the distribution's 2.5% and 97.5% quantiles, up to the Monte Carlo error of 2000
    draws (the levels 1.5%-3.5% and 96.5%-98.5%, about 3 standard errors of an estimated 2.5% point)."""
    low, high = interval
    assert _quantile(distribution, Fraction(15, 1000)) <= low <= _quantile(distribution, Fraction(35, 1000))
    assert _quantile(distribution, Fraction(965, 1000)) <= high <= _quantile(distribution, Fraction(985, 1000))


def _drawn_means(values: np.ndarray, task: str, seed: int, resamples: int) -> np.ndarray:
    """The documented draw, written out here: the task's generator seeded by (seed, CRC-32 of its name)."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])
    return 100 * values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)


def _percentiles(replicates: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(replicates, [2.5, 97.5])
    return round(float(low), 2), round(float(high), 2)


@pytest.mark.parametrize("scores,expected", [([0, 0, 0, 1, 1], (0.0, 80.0)), ([0, 1, 1, 1], (25.0, 100.0))])
def test_task_interval_is_the_percentiles_of_the_enumerated_bootstrap_distribution(scores, expected):
    distribution = _resample_distribution(scores)
    interval = RowReplicates({"t": np.array(scores, float)}, RESAMPLING).interval(["t"])
    _assert_percentiles_of(interval, distribution)
    assert interval == expected  # the quantiles lie well inside one value's step: one answer, and not min and max


def test_average_interval_resamples_each_task_within_itself():
    first, second = [0, 0, 0, 1, 1], [0, 1, 1, 1]
    stratified = _mean_of(_resample_distribution(first), _resample_distribution(second))
    interval = RowReplicates({"a": np.array(first, float), "b": np.array(second, float)}, RESAMPLING).interval(
        ["a", "b"])
    _assert_percentiles_of(interval, stratified)
    # resampling the 9 samples together: 4 of them are 0, so a resample counts k zero-draws, k ~ Binomial(9, 4/9)
    pooled = Counter({Fraction(100 * (9 - k), 9): math.comb(9, k) * Fraction(4, 9) ** k * Fraction(5, 9) ** (9 - k)
                      for k in range(10)})
    assert _quantile(pooled, Fraction(35, 1000)) < interval[0]


def test_interval_is_the_documented_draw_of_each_tasks_generator():
    rng = np.random.default_rng(7)
    groups = {"hotpotqa": rng.random(30).round(6), "passkey": rng.integers(0, 2, 12).astype(float)}
    replicates = RowReplicates(groups, Resampling(seed=3, resamples=500))
    for task, values in groups.items():
        assert replicates.interval([task]) == _percentiles(_drawn_means(values, task, 3, 500))
    stratified = (_drawn_means(groups["hotpotqa"], "hotpotqa", 3, 500) + _drawn_means(groups["passkey"], "passkey",
                                                                                        3, 500)) / 2
    assert replicates.interval(["hotpotqa", "passkey"]) == _percentiles(stratified)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another():
    values = {"t": np.random.default_rng(1).random(40)}
    assert RowReplicates(values, Resampling(seed=5)).interval(["t"]) == RowReplicates(
        values, Resampling(seed=5)).interval(["t"])
    assert RowReplicates(values, Resampling(seed=5)).interval(["t"]) != RowReplicates(
        values, Resampling(seed=6)).interval(["t"])


def test_intervals_agree_with_scipy_bootstrap():
    """scipy resamples each of several samples independently, which is the stratified rule."""
    rng = np.random.default_rng(11)
    groups = {"a": rng.integers(0, 2, 60).astype(float), "b": rng.random(40)}
    ours = RowReplicates(groups, RESAMPLING)

    def mean_of_means(*samples, axis=-1):
        return np.mean([100 * np.mean(sample, axis=axis) for sample in samples], axis=0)

    for tasks in (["a"], ["b"], ["a", "b"]):
        theirs = stats.bootstrap([groups[task] for task in tasks], mean_of_means, n_resamples=9999,
                                 method="percentile", rng=np.random.default_rng(0)).confidence_interval
        assert ours.interval(tasks) == pytest.approx((theirs.low, theirs.high), abs=1.5)


def test_a_task_with_fewer_than_two_samples_has_no_interval():
    replicates = RowReplicates({"one": np.array([1.0]), "two": np.array([0.0, 1.0])}, RESAMPLING)
    assert replicates.interval(["one"]) is None and replicates.interval(["one", "two"]) is None
    assert replicates.interval(["two"]) is not None


@pytest.mark.parametrize("n", [5, 40])  # every sign pattern enumerated; random patterns
def test_identical_rows_differ_by_zero_with_p_one(n):
    scores = _samples(np.random.default_rng(n).random(n))
    comparison = PairedRow({"t": scores}, {"t": scores}, RESAMPLING).compare(["t"])
    assert (comparison.difference, comparison.low, comparison.high, comparison.p) == (0.0, 0.0, 0.0, 1.0)
    assert math.isnan(comparison.mdd)  # no spread in the differences: the formula does not apply


def test_a_constant_shift_gets_the_smallest_p_the_test_can_give():
    base = np.random.default_rng(2).random(40) * 0.5
    for n, smallest in ((5, 2 / 2 ** 5), (40, 1 / (RESAMPLING.resamples + 1))):
        comparison = PairedRow({"t": _samples(base[:n] + 0.25)}, {"t": _samples(base[:n])}, RESAMPLING).compare(["t"])
        assert comparison.p == pytest.approx(smallest)
        assert (comparison.difference, comparison.low, comparison.high) == (25.0, 25.0, 25.0)


def test_sign_flip_p_equals_scipy_permutation_test():
    rng = np.random.default_rng(4)
    differences = rng.integers(-1, 2, 8).astype(float) + rng.random(8) * 0.1

    def mean(values, axis=-1):
        return np.mean(values, axis=axis)

    exact = stats.permutation_test((differences,), mean, permutation_type="samples", n_resamples=RESAMPLING.resamples,
                                   rng=np.random.default_rng(0)).pvalue
    assert sign_flip_p([differences], RESAMPLING) == pytest.approx(exact, abs=1e-12)
    # two tasks (4 and 5 samples): the mean of the task means, every pattern of the 9 signs
    tasks = [differences[:4], rng.random(5) - 0.4]

    def stratified(values, axis=-1):
        values = np.moveaxis(values, axis, -1)
        return (values[..., :4].mean(axis=-1) + values[..., 4:].mean(axis=-1)) / 2

    exact = stats.permutation_test((np.concatenate(tasks),), stratified, permutation_type="samples",
                                   n_resamples=RESAMPLING.resamples, rng=np.random.default_rng(0)).pvalue
    assert sign_flip_p(tasks, RESAMPLING) == pytest.approx(exact, abs=1e-12)
    # random patterns (2^60 > 2000): both estimate the same p
    many = rng.random(60) - 0.42
    drawn = stats.permutation_test((many,), mean, permutation_type="samples", n_resamples=9999,
                                   rng=np.random.default_rng(0)).pvalue
    assert sign_flip_p([many], RESAMPLING) == pytest.approx(drawn, abs=0.03)


def test_differences_pair_the_samples_both_rows_have_by_id():
    first = _samples([1.0, 0.5, 0.0, 1.0], ["a", "b", "c", "d"])
    second = _samples([0.0, 0.0, 1.0, 0.25], ["d", "c", "x", "a"])
    assert paired_differences(first, second).tolist() == [0.75, 0.0, 1.0]  # a, c, d in the first's order
    comparison = PairedRow({"t": first}, {"t": second}, RESAMPLING).compare(["t"])
    assert comparison.n == {"t": 3} and comparison.difference == round(100 * (0.75 + 0.0 + 1.0) / 3, 2)


def test_minimum_detectable_difference_is_2_80_standard_errors():
    assert MDD_FACTOR == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    rng = np.random.default_rng(5)
    first = {"a": _samples(rng.random(50)), "b": _samples(rng.random(20))}
    second = {"a": _samples(rng.random(50)), "b": _samples(rng.random(20))}
    paired = PairedRow(first, second, RESAMPLING)
    sd = {task: np.std(first[task].scores - second[task].scores, ddof=1) for task in first}
    assert paired.compare(["a"]).mdd == round(MDD_FACTOR * 100 * sd["a"] / math.sqrt(50), 2)
    both = math.sqrt(sd["a"] ** 2 / 50 + sd["b"] ** 2 / 20) / 2
    assert paired.compare(["a", "b"]).mdd == round(MDD_FACTOR * 100 * both, 2)
    # before a second run exists: sd_diff = sqrt(2) x the run's sd
    assert run_mdd([first["a"].scores]) == round(
        MDD_FACTOR * 100 * math.sqrt(2) * np.std(first["a"].scores, ddof=1) / math.sqrt(50), 2)


def test_resampling_options_are_checked():
    with pytest.raises(EvalkvError, match="at least 100"):
        Resampling(resamples=10)
    with pytest.raises(EvalkvError, match="non-negative"):
        Resampling(seed=-1)


def _records(task: str, correct: list[bool], ids: bool = True) -> list[dict]:
    return [{**({"id": f"{task}-{i}"} if ids else {}), "task": task, "pred": "12345" if right else "no",
             "answers": ["12345"], "depth": 50.0, "context_length": 256} for i, right in enumerate(correct)]


def test_scores_json_keeps_each_tasks_per_sample_scores_with_their_ids():
    scores = score_records(_records("passkey", [True, False, True]) + _records("needle", [], ids=False))
    assert scores["sample_scores"] == {"passkey": {"ids": ["passkey-0", "passkey-1", "passkey-2"],
                                                   "scores": [1, 0, 1]}}
    loose = score_records(_records("passkey", [False, True], ids=False))  # predictions written elsewhere
    assert loose["sample_scores"]["passkey"]["ids"] == ["#0", "#1"]
    assert task_samples(loose)["passkey"].scores.tolist() == [0.0, 1.0]
    assert task_samples({**loose, "task_scores": {"passkey": 70.0}}) == {}  # not the samples' mean: no interval


def _run(folder, method: str, scores_by_task: dict[str, list[float]], ids=None):
    """A LongBench run whose scores.json holds these per-sample scores (no predictions file)."""
    samples = {task: {"ids": ids or [f"{task}/{i}" for i in range(len(values))], "scores": values}
               for task, values in scores_by_task.items()}
    task_scores = {task: round(100 * sum(values) / len(values), 2) for task, values in scores_by_task.items()}
    overrides, scores = longbench(method, list(scores_by_task), task_scores)
    make_run(folder, overrides, {**scores, "n": {t: len(v) for t, v in scores_by_task.items()},
                                 "sample_scores": samples})


def _json_rows(capsys, *args: str) -> list[dict]:
    assert main(["table", *args, "--intervals", "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_table_intervals_come_from_scores_json_alone_and_averages_are_stratified(tmp_path, capsys):
    rng = np.random.default_rng(8)
    values = {"hotpotqa": rng.random(15).round(6).tolist(), "2wikimqa": rng.integers(0, 2, 10).tolist()}
    _run(tmp_path / "snap", "snapkv", values)
    row = _json_rows(capsys, str(tmp_path), "--seed", "4", "--resamples", "300")[0]
    arrays = {task: np.array(v, float) for task, v in values.items()}
    for task in values:
        assert (row[f"{task}_low"], row[f"{task}_high"]) == _percentiles(_drawn_means(arrays[task], task, 4, 300))
    stratified = (_drawn_means(arrays["hotpotqa"], "hotpotqa", 4, 300) + _drawn_means(arrays["2wikimqa"], "2wikimqa",
                                                                                       4, 300)) / 2
    assert (row["average_low"], row["average_high"]) == _percentiles(stratified)
    assert (row["Multi-Doc QA_low"], row["Multi-Doc QA_high"]) == (row["average_low"], row["average_high"])


def test_table_deltas_with_intervals_mark_differences_the_paired_test_finds(tmp_path, capsys):
    right, wrong = [1] * 24, [0] * 24  # 2^24 sign patterns: 2000 random ones almost surely miss the 2 extremes
    _run(tmp_path / "full", "full", {"hotpotqa": right, "2wikimqa": right})
    _run(tmp_path / "snap", "snapkv", {"hotpotqa": wrong, "2wikimqa": right})
    _run(tmp_path / "tova", "tova", {"hotpotqa": right[:6], "2wikimqa": right})
    assert main(["table", str(tmp_path), "--intervals", "--delta"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[2] == ("| random-tiny-llama | full | - | 100.00 [100.00, 100.00] | 100.00 [100.00, 100.00] | "
                        "100.00 [100.00, 100.00] | 100.00 [100.00, 100.00] |")
    assert lines[3] == ("| random-tiny-llama | snapkv | 128 | -100.00 [-100.00, -100.00] * | +0.00 [+0.00, +0.00] | "
                        "-50.00 [-50.00, -50.00] * | -50.00 [-50.00, -50.00] * |")
    assert "tova / 128: hotpotqa compared with the full cache on the 6 samples both have (6 and 24 scored)" in (
        captured.err)
    rows = _json_rows(capsys, str(tmp_path), "--delta")
    assert rows[1]["hotpotqa_p"] == pytest.approx(1 / 2001) and rows[1]["2wikimqa_p"] == 1.0
    assert rows[0]["hotpotqa_p"] is None and rows[0]["hotpotqa_low"] == 100.0


def test_intervals_are_for_the_scores_view_and_resamples_are_checked(tmp_path, capsys):
    _run(tmp_path / "snap", "snapkv", {"hotpotqa": [0, 1]})
    assert main(["table", str(tmp_path), "--intervals", "--view", "timing"]) != 0
    assert "--intervals applies to the scores view" in capsys.readouterr().err
    assert main(["table", str(tmp_path), "--intervals", "--resamples", "10"]) != 0
    assert "--resamples must be at least 100" in capsys.readouterr().err


def test_a_run_without_per_sample_scores_has_no_interval_and_is_named(tmp_path, capsys):
    make_run(tmp_path / "old", *longbench("snapkv", ["hotpotqa"], {"hotpotqa": 40.0}))
    assert main(["table", str(tmp_path), "--intervals"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[2] == "| random-tiny-llama | snapkv | 128 | 40.00 | 40.00 | 40.00 |"
    assert "no per-sample scores for hotpotqa" in captured.err


def test_score_prints_intervals_and_minimum_detectable_differences(tmp_path, capsys):
    records = _records("passkey", [True, False, True, True, False, True, True, True])
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["score", str(tmp_path)]) == 0
    assert "95% interval" not in capsys.readouterr().out  # off by default
    assert main(["score", str(tmp_path), "--intervals"]) == 0
    out = capsys.readouterr().out
    values = np.array([1, 0, 1, 1, 0, 1, 1, 1], float)
    low, high = _percentiles(_drawn_means(values, "passkey", 0, 2000))
    mdd = run_mdd([values])
    assert f"passkey  passkey_accuracy  8  75.00  [{low:.2f}, {high:.2f}]  {mdd:.2f}" in out
    assert "mdd: the smallest difference" in out
    stored = json.loads((tmp_path / "scores.json").read_text())
    assert stored["sample_scores"]["passkey"]["scores"] == values.astype(int).tolist()


def test_curves_draw_each_score_in_its_interval_band(tmp_path, monkeypatch):
    index = pd.MultiIndex.from_tuples([("m", "full", "-"), ("m", "snapkv", "64"), ("m", "snapkv", "128")],
                                      names=["model", "method", "budget"])
    frame = pd.DataFrame({"passkey": [90.0, 40.0, 60.0]}, index=index)
    low = pd.DataFrame({"passkey": [80.0, 30.0, 50.0]}, index=index)
    high = pd.DataFrame({"passkey": [95.0, 50.0, 70.0]}, index=index)
    figures = []
    monkeypatch.setattr(curves, "save_figure", lambda figure, output: figures.append(figure) or output)
    curves.plot_curves(frame, tmp_path / "c.png", bands=(low, high))
    axis = figures[0].axes[0]
    band = [c for c in axis.collections if c.get_paths()][0].get_paths()[0].vertices
    assert band[:, 1].min() == 30.0 and band[:, 1].max() == 70.0 and sorted(set(band[:, 0])) == [64.0, 128.0]
    strip = axis.patches[0]  # the full cache's interval across the panel
    assert (strip.get_y(), strip.get_y() + strip.get_height()) == (80.0, 95.0)
