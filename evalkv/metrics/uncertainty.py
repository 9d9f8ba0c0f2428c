"""Uncertainty of scores over samples: bootstrap intervals, paired sign-flip tests, minimum detectable differences.

A task score is 100 x the mean of its samples' scores (every metric evalkv registers; `task_samples` checks it), so
its uncertainty comes from which samples the benchmark happened to draw. Everything here treats a task's samples as
independent draws and a table's tasks as fixed strata:

- Interval: the 95% percentile bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13),
  `resamples` resamples drawn with replacement within each task. An average over tasks (a category, the overall
  average) is resampled stratified (Davison & Hinkley, "Bootstrap Methods and their Application", 1997, on
  stratified resampling): every task is resampled within itself and the resampled task scores are averaged as the
  table averages them, so each replicate of an average comes from the same replicates as its tasks'.
  Each task draws from its own generator, seeded by the seed and the task's name (CRC-32): a task's interval does not
  change when other tasks are added, and two rows with the same samples of a task use the same resample indices.
- Paired test of a row against another (a method against the full cache) on the samples both have, matched by sample
  id: the interval of the mean difference by the same stratified bootstrap over the per-sample differences, and a
  two-sided sign-flip permutation test (Fisher, "The Design of Experiments", 1935, on Darwin's paired plants) of
  the same statistic: under the null each difference is as likely to have either sign.
  p = share of sign patterns whose |statistic| >= the observed one: every pattern when 2^n <= `resamples` (exact,
  as scipy.stats.permutation_test enumerates), else `resamples` random ones, drawn once per row for all its tasks,
  with p = (1 + hits) / (1 + resamples) (Phipson & Smyth 2010, doi:10.2202/1544-6115.1585). With few samples the
  bootstrap interval can exclude 0 where the exact test cannot reach p < 0.05 (percentile intervals are too narrow
  for small n); the marker of a significant difference follows the test.
- Minimum detectable difference: MDD = (z_{1-alpha/2} + z_{1-beta}) x SE, alpha = 0.05, power 1 - beta = 0.8
  (2.80 x SE), the normal-approximation power formula of a two-sided paired test solved for the difference
  (Chow, Shao & Wang, "Sample Size Calculations in Clinical Research", 2nd ed. 2008, §3.1; Miller 2024, "Adding Error
  Bars to Evals", arXiv 2411.00640, power analysis). For one task SE = sd_diff / sqrt(n); for an average over T tasks
  SE = sqrt(sum_t sd_t^2 / n_t) / T (sample standard deviations, on the 0-100 scale).

Why not scipy.stats.bootstrap / permutation_test: both fit one statistic per call, but a table needs the interval of
every task, category and average of every row, and the paired test of every method row. Drawing each task's
resamples once per row and combining them serves all its columns (one 16-task row of 200 samples per task, its 16
tasks, 4 categories and average: 0.40 s here against 2.1 s for one scipy.stats.bootstrap call per column, 2000
resamples, on the development machine's two shared cores); the stratified sign-flip statistic is linear in the
signs, so its null distribution is a product of random bits with the differences, where scipy's one-sample
`permutation_type='samples'` took 3.9 s for 3200 differences x 2000 resamples (0.05 s here). The tests check both
against scipy on cases where they must agree.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from evalkv.errors import EvalkvError

CONFIDENCE = 0.95
ALPHA = 0.05  # the significance level of the paired test and of the minimum detectable difference
POWER = 0.8
MDD_FACTOR = float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))  # 2.8016


@dataclass(frozen=True)
class Resampling:
    """How intervals and tests resample: the seed and the number of resamples (the same seed gives the same
    numbers)."""

    seed: int = 0
    resamples: int = 2000

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise EvalkvError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.resamples < 100:
            raise EvalkvError(f"--resamples must be at least 100 (a 95% interval reads the 2.5% and 97.5% "
                              f"percentiles of the resamples), got {self.resamples}; the default is 2000")


@dataclass(frozen=True)
class Samples:
    """One task's per-sample scores (0-1) in record order, with their sample ids."""

    ids: tuple[str, ...]
    scores: np.ndarray


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two rows on the samples both have: the mean difference (0-100 scale), its interval,
    the sign-flip p-value, the minimum detectable difference and the samples paired per task."""

    difference: float
    low: float
    high: float
    p: float
    mdd: float
    n: dict[str, int]


def task_samples(scores_json: dict) -> dict[str, Samples]:
    """The per-sample scores of a scores.json (`sample_scores`) for the tasks whose score is 100 x their mean (a
    metric that aggregates otherwise gets no interval rather than a wrong one)."""
    found = {}
    for task, entry in (scores_json.get("sample_scores") or {}).items():
        values = np.asarray(entry.get("scores", []), dtype=float)
        score = (scores_json.get("task_scores") or {}).get(task)
        if len(values) and len(entry.get("ids", [])) == len(values) and isinstance(score, (int, float)) and abs(
                100 * values.mean() - score) <= 0.006:
            found[task] = Samples(tuple(str(i) for i in entry["ids"]), values)
    return found


def _generator(resampling: Resampling, task: str) -> np.random.Generator:
    return np.random.default_rng([resampling.seed, zlib.crc32(task.encode("utf-8"))])


def bootstrap_means(values: np.ndarray, task: str, resampling: Resampling) -> np.ndarray:
    """100 x the means of `resampling.resamples` resamples (with replacement, of the same size) of one task's
    values; draw b is `values[indices[b]]` with `indices = rng.integers(0, n, (resamples, n))` from the task's
    generator."""
    indices = _generator(resampling, task).integers(0, len(values), size=(resampling.resamples, len(values)))
    return 100 * values[indices].mean(axis=1)


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    """The central CONFIDENCE interval of the replicates (numpy's linear percentiles), 2 decimals."""
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return round(float(low), 2), round(float(high), 2)


class RowReplicates:
    """One row's stratified bootstrap: each task resampled once, every column's interval (a task, or the mean of
    several tasks' scores: a category, the average) from the same draws."""

    def __init__(self, groups: dict[str, np.ndarray], resampling: Resampling) -> None:
        self._replicates = {task: bootstrap_means(values, task, resampling) for task, values in groups.items()
                            if len(values) >= 2}

    def interval(self, tasks: list[str]) -> tuple[float, float] | None:
        """The interval of the mean of these tasks' scores; None when one of them has fewer than 2 samples."""
        if not tasks or any(task not in self._replicates for task in tasks):
            return None
        return percentile_interval(np.mean([self._replicates[task] for task in tasks], axis=0))


def standard_error(groups: list[np.ndarray]) -> float:
    """The standard error (0-100 scale) of the mean over tasks of 100 x each task's mean: sqrt(sum s_t^2/n_t) / T;
    NaN when a task has fewer than 2 samples."""
    if not groups or any(len(values) < 2 for values in groups):
        return float("nan")
    return 100 * math.sqrt(sum(float(np.var(values, ddof=1)) / len(values) for values in groups)) / len(groups)


def minimum_detectable_difference(error: float) -> float:
    """MDD = (z_{1-alpha/2} + z_{1-beta}) x SE (module docstring); NaN when SE is 0 or unknown (the normal
    approximation has no variance to work with)."""
    return round(MDD_FACTOR * error, 2) if error > 0 else float("nan")


def run_mdd(groups: list[np.ndarray]) -> float:
    """The minimum detectable difference of a paired comparison of one run's samples with another run of the same
    samples before that run exists: sd_diff taken as sqrt(2) x the observed sd, as if the other run's per-sample
    scores had the same variance and no correlation with these (an upper bound for methods that tend to fail the
    same samples, whose differences vary less)."""
    return minimum_detectable_difference(math.sqrt(2) * standard_error(groups))


def paired_differences(first: Samples, second: Samples) -> np.ndarray:
    """first - second on the samples both have, matched by id (the k-th repeat of an id with the k-th), in the
    first's order."""
    def keyed(samples: Samples) -> dict[tuple[str, int], float]:
        seen: dict[str, int] = {}
        keys = {}
        for sample_id, score in zip(samples.ids, samples.scores):
            seen[sample_id] = seen.get(sample_id, -1) + 1
            keys[(sample_id, seen[sample_id])] = float(score)
        return keys

    others = keyed(second)
    return np.array([score - others[key] for key, score in keyed(first).items() if key in others], dtype=float)


TOLERANCE = 1e-9  # on the 0-100 scale: the same sum in another order is not a more extreme statistic


def sign_flip_nulls(groups: list[np.ndarray], resampling: Resampling) -> list[np.ndarray]:
    """For each group of differences, 100 x its mean under `resamples` random sign patterns, one pattern per resample
    drawn for all groups at once: the bits of `rng.integers(0, 256, (resamples, ceil(N / 8)), uint8)` (numpy's
    unpackbits order, N the samples of all groups in order), bit 1 flipping a sample's sign."""
    total = sum(len(values) for values in groups)
    raw = _generator(resampling, "sign-flip").integers(0, 256, size=(resampling.resamples, -(-total // 8)),
                                                       dtype=np.uint8)
    flips = np.unpackbits(raw, axis=1, count=total)
    bounds = np.cumsum([0, *(len(values) for values in groups)])
    return [100 * (values.sum() - 2 * (flips[:, start:end] @ values)) / len(values)
            for values, start, end in zip(groups, bounds, bounds[1:])]


def sign_flip_p(groups: list[np.ndarray], resampling: Resampling, nulls: list[np.ndarray] | None = None) -> float:
    """Two-sided sign-flip p-value of the mean over groups of 100 x each group's mean difference (module
    docstring): exact over every sign pattern when 2^N <= resamples, else from `nulls` (`sign_flip_nulls`, drawn
    when not given)."""
    observed = abs(float(np.mean([100 * values.mean() for values in groups])))
    total = sum(len(values) for values in groups)
    if 2 ** total <= resampling.resamples:
        weighted = np.concatenate([100 * values / (len(groups) * len(values)) for values in groups])
        patterns = np.arange(2 ** total)[:, None] >> np.arange(total)  # every sign pattern once
        return float(np.mean(np.abs((1.0 - 2.0 * (patterns & 1)) @ weighted) >= observed - TOLERANCE))
    null = np.mean(nulls if nulls is not None else sign_flip_nulls(groups, resampling), axis=0)
    return (1 + int(np.sum(np.abs(null) >= observed - TOLERANCE))) / (1 + resampling.resamples)


class PairedRow:
    """Paired comparisons of one row (first) with another (second): per task the differences on the samples both
    have, resampled once (bootstrap and sign flips); `compare` gives any column's comparison (a task, or a category's
    or the average's tasks) from the same draws."""

    def __init__(self, first: dict[str, Samples], second: dict[str, Samples], resampling: Resampling) -> None:
        self.differences = {task: paired_differences(first[task], second[task]) for task in first if task in second}
        self._resampling = resampling
        self._replicates = RowReplicates(self.differences, resampling)
        self._nulls = dict(zip(self.differences, sign_flip_nulls(list(self.differences.values()), resampling)))

    def compare(self, tasks: list[str]) -> Comparison | None:
        """first - second over these tasks, stratified by task; None when one of them is missing from either row
        or has fewer than 2 paired samples."""
        interval = self._replicates.interval(tasks)
        if interval is None:
            return None
        groups = [self.differences[task] for task in tasks]
        difference = round(float(np.mean([100 * values.mean() for values in groups])), 2)
        p = sign_flip_p(groups, self._resampling, [self._nulls[task] for task in tasks])
        return Comparison(difference, *interval, p, minimum_detectable_difference(standard_error(groups)),
                          {task: len(self.differences[task]) for task in tasks})
