"""Confidence intervals over samples (seeds): means, paired differences, and how many samples separate them.

Every figure and table that reports a per-sample distance (relative L2 of features or images, one value per
seed) reports its mean with a 95% interval over samples, from the same function:

- ``bootstrap``: the percentile interval of the mean over ``resamples`` resamples of the samples with
  replacement, drawn by a generator seeded with ``seed`` (same values, same interval);
- ``t``: mean +- t_{n-1, 0.975} * sd / sqrt(n) (sd with ddof 1).

A paired comparison (two settings on the same seeds) takes the interval of the mean per-seed difference;
it separates settings whose intervals overlap, because the seed-to-seed spread they share cancels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["Interval", "IntervalMethod", "mean_interval", "paired_difference", "samples_to_separate",
           "summarize", "paired_table"]

IntervalMethod = Literal["bootstrap", "t"]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` samples with its interval [low, high] at ``level``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes(self, value: float) -> bool:
        """True when ``value`` lies outside [low, high]."""
        return value < self.low or value > self.high

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"


def _values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"an interval needs finite values, got {array.size} values "
                         f"({int((~np.isfinite(array)).sum())} not finite)")
    return array


_DRAW_BLOCK = 1 << 22  # resample indices drawn at once by `mean_interval`


def mean_interval(values: Sequence[float] | np.ndarray, level: float = 0.95, method: IntervalMethod = "bootstrap",
                  resamples: int = 10_000, seed: int = 0) -> Interval:
    """The mean of ``values`` (one per sample) with its ``level`` interval (see the module docstring).

    One value gives the degenerate interval [mean, mean]."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if method not in ("bootstrap", "t"):
        raise ValueError(f"method must be 'bootstrap' or 't', got {method!r}")
    array = _values(values)
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, mean, mean, 1, level)
    if method == "t":
        half = float(stats.t.ppf(0.5 + level / 2, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size))
        return Interval(mean, mean - half, mean + half, int(array.size), level)
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a percentile interval, got {resamples}")
    rng = np.random.default_rng(seed)
    # Drawn a block of rows at a time: the same draws as one (resamples, n) array, without its n x resamples
    # indices in memory at once (800 MB for 10,000 seeds, most of the time spent paging it in).
    rows = max(1, _DRAW_BLOCK // array.size)
    means = np.concatenate([array[rng.integers(0, array.size, size=(min(rows, resamples - start), array.size))]
                            .mean(axis=1) for start in range(0, resamples, rows)])
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(mean, float(low), float(high), int(array.size), level)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95,
                      method: IntervalMethod = "bootstrap", seed: int = 0) -> Interval:
    """The interval of mean(a - b) over samples paired by position (the same seeds in the same order)."""
    a, b = _values(a), _values(b)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one value per sample on both sides, got {a.size} and {b.size}")
    return mean_interval(a - b, level, method, seed=seed)


def samples_to_separate(differences: Sequence[float] | np.ndarray, level: float = 0.95) -> float:
    """Samples needed for a paired interval (normal approximation) to exclude 0 at the observed effect:
    ceil((z * sd / |mean|)^2) of the per-sample differences; inf when the mean difference is 0."""
    array = _values(differences)
    if array.size < 2:
        raise ValueError(f"estimating a spread needs at least 2 differences, got {array.size}")
    mean, sd = abs(float(array.mean())), float(array.std(ddof=1))
    if mean == 0.0:
        return math.inf
    z = float(stats.norm.ppf(0.5 + level / 2))
    return float(max(2, math.ceil((z * sd / mean) ** 2)))


def summarize(per_sample: pd.DataFrame, by: Sequence[str], value: str, level: float = 0.95,
              method: IntervalMethod = "bootstrap") -> pd.DataFrame:
    """One row per group of ``by``: mean, ci95_low, ci95_high and n of column ``value`` (one row per sample)."""
    missing = [c for c in [*by, value] if c not in per_sample.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the per-sample table (it has {list(per_sample.columns)})")
    rows = []
    for key, group in per_sample.groupby(list(by), sort=False):
        interval = mean_interval(group[value].to_numpy(), level, method)
        keys = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, keys)), "mean": interval.mean, "ci95_low": interval.low,
                     "ci95_high": interval.high, "n": interval.n})
    return pd.DataFrame(rows)


def paired_table(per_sample: pd.DataFrame, setting: str, value: str, baseline: object, sample: str = "seed",
                 level: float = 0.95) -> pd.DataFrame:
    """Each setting (column ``setting``) against ``baseline`` on the same samples: the mean per-sample
    difference (setting - baseline) with its interval, whether it excludes 0, and the samples a paired
    interval would need to exclude 0 at the observed effect (`samples_to_separate`)."""
    wide = per_sample.pivot(index=sample, columns=setting, values=value)
    if baseline not in wide.columns:
        raise ValueError(f"baseline {baseline!r} not among the settings {list(wide.columns)}")
    rows = []
    for other in [c for c in wide.columns if c != baseline]:
        pair = wide[[other, baseline]].dropna()
        diff = pair[other].to_numpy() - pair[baseline].to_numpy()
        interval = mean_interval(diff, level)
        rows.append({setting: other, "baseline": baseline, "mean_difference": interval.mean,
                     "ci95_low": interval.low, "ci95_high": interval.high, "n": interval.n,
                     "separated": interval.excludes(0.0),
                     "samples_to_separate": samples_to_separate(diff, level) if diff.size > 1 else math.nan})
    return pd.DataFrame(rows)
