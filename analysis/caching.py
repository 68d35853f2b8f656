"""Figure 1a summaries: which steps a cached model refreshes, and a fair comparison of refresh intervals.

A layer cached with refresh interval N (QuantConfig mode ``cache``) computes exactly at its first
``warmup_steps`` calls and at every sampling index i with i % N == 0; at the other indices it reuses its
previous output ("skips"). The feature error is near its minimum on a refresh step and largest just before
one, so the curves are sawtooths, and comparing intervals at one index mixes refresh and skip steps (at
the last of 100 steps, index 99 is a refresh for N = 3 and a skip for N = 2 and 5). `caching_summary`
compares them instead

- at the last index that every N skips (``last common skip``) where each N's reused output came from another
  input: where a spacing repeats a timestep (``quad`` at 100 steps ends with t = 0 four times, and DDIM from t
  to t leaves x as it was), a skip reuses an output of the same input, and its distance to the standard
  model is the trajectories' drift, not the cost of reusing,
- averaged over all steps, and
- averaged over the steps each N skips,

each as a mean over samples (per-sample average over the steps first) with a 95% interval
(`analysis.intervals.mean_interval`), and also gives the last step itself, labelled refresh or skip, and each
N's own last skip of a new input (`last_informative_skip`): the error late in sampling at its largest for that N,
which the common step leaves out where N refreshes near the end (N = 3 at step 99).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.intervals import Interval, mean_interval

__all__ = ["refresh_steps", "skipped_steps", "steps_skipped_by_all", "last_informative_common_skip",
           "last_informative_skip", "caching_summary", "growth_with_step", "growth_by_interval"]


def _check(steps: int, interval: int, warmup_steps: int) -> None:
    if steps < 1 or interval < 1 or warmup_steps < 1:
        raise ValueError(f"steps, interval and warmup_steps must be >= 1, got {steps}, {interval}, {warmup_steps}")


def refresh_steps(steps: int, interval: int, warmup_steps: int = 1) -> tuple[int, ...]:
    """Sampling indices in [0, steps) at which a layer cached with refresh interval ``interval`` computes."""
    _check(steps, interval, warmup_steps)
    return tuple(i for i in range(steps) if i < warmup_steps or i % interval == 0)


def skipped_steps(steps: int, interval: int, warmup_steps: int = 1) -> tuple[int, ...]:
    """Sampling indices at which it reuses its previous output."""
    refresh = set(refresh_steps(steps, interval, warmup_steps))
    return tuple(i for i in range(steps) if i not in refresh)


def steps_skipped_by_all(steps: int, intervals: Sequence[int], warmup_steps: int = 1) -> tuple[int, ...]:
    """Sampling indices that every interval in ``intervals`` skips (none refreshes there)."""
    if not intervals:
        raise ValueError("steps_skipped_by_all needs at least one interval")
    common = set(range(steps))
    for n in intervals:
        common &= set(skipped_steps(steps, int(n), warmup_steps))
    return tuple(sorted(common))


def last_informative_common_skip(intervals: Sequence[int], timesteps: Sequence[int],
                                 warmup_steps: int = 1) -> int | None:
    """The last index every interval skips at which, for every interval, the timestep differs from that of the
    refresh whose output it reuses (so the input differs: x changes only where the timestep does); None if
    there is none."""
    steps = len(timesteps)
    for i in reversed(steps_skipped_by_all(steps, intervals, warmup_steps)):
        reused = [max(r for r in refresh_steps(steps, int(n), warmup_steps) if r < i) for n in intervals]
        if all(int(timesteps[r]) != int(timesteps[i]) for r in reused):
            return i
    return None


def last_informative_skip(interval: int, timesteps: Sequence[int], warmup_steps: int = 1) -> int | None:
    """`last_informative_common_skip` for one interval: the last index it skips whose input differs from that of
    the refresh it reuses; None if there is none."""
    return last_informative_common_skip([interval], timesteps, warmup_steps)


def _mean_over(part: pd.DataFrame, steps: Sequence[int]) -> pd.Series:
    """Each sample's mean error over ``steps``."""
    return part[part["step"].isin(list(steps))].groupby("sample")["rel_l2"].mean()


def _row(interval: int, comparison: str, steps: Sequence[int], per_sample: pd.DataFrame) -> dict[str, object]:
    """Mean over samples of each sample's mean over ``steps``, with its interval."""
    interval_ = mean_interval(_mean_over(per_sample, steps).to_numpy())
    label = ", ".join(map(str, steps)) if len(steps) <= 3 else f"{len(steps)} steps"
    return {"interval": interval, "comparison": comparison, "steps": label, "mean": interval_.mean,
            "ci95_low": interval_.low, "ci95_high": interval_.high, "n_samples": interval_.n}


def caching_summary(samples: pd.DataFrame, timesteps: Sequence[int], warmup_steps: int = 1) -> pd.DataFrame:
    """Per interval N (``samples``: `analysis.network.caching_error_samples`, sampled on ``timesteps``): rows for
    the last common skip step of a new input (`last_informative_common_skip`), the mean over all steps, the mean
    over N's skipped steps, the last step and N's own last skip of a new input (see the module docstring); columns
    interval, comparison, steps, mean, ci95_low, ci95_high, n_samples."""
    needed = {"interval", "step", "sample", "rel_l2"}
    if not needed <= set(samples.columns):
        raise ValueError(f"caching_summary needs columns {sorted(needed)}, got {list(samples.columns)}")
    steps = int(samples["step"].max()) + 1
    if len(timesteps) != steps:
        raise ValueError(f"caching_summary got {len(timesteps)} timesteps for samples of {steps} steps")
    intervals = sorted(int(n) for n in samples["interval"].unique())
    common = last_informative_common_skip(intervals, timesteps, warmup_steps)
    rows = []
    for n in intervals:
        part = samples[samples["interval"] == n]
        if common is not None:
            rows.append(_row(n, "last step every N skips", [common], part))
        rows.append(_row(n, "mean over all steps", range(steps), part))
        skipped = skipped_steps(steps, n, warmup_steps)
        if skipped:
            rows.append(_row(n, "mean over its skipped steps", skipped, part))
        kind = "refresh" if steps - 1 in refresh_steps(steps, n, warmup_steps) else "skip"
        rows.append(_row(n, f"last step ({kind} for this N)", [steps - 1], part))
        own = last_informative_skip(n, timesteps, warmup_steps)
        if own is not None:
            rows.append(_row(n, "its last skip of a new input", [own], part))
    return pd.DataFrame(rows)


def growth_with_step(samples: pd.DataFrame, interval: int, warmup_steps: int = 1) -> Interval:
    """Does the error grow with the step? Per sample, the mean error over the steps ``interval`` skips in
    the second half of sampling minus that over the first half; its mean over samples with a 95% interval
    (above 0: it grows)."""
    part = samples[samples["interval"] == interval]
    if part.empty:
        raise ValueError(f"no rows for interval {interval}; intervals present: {sorted(samples['interval'].unique())}")
    steps = int(part["step"].max()) + 1
    skipped = np.asarray(skipped_steps(steps, interval, warmup_steps))
    early, late = skipped[skipped < steps / 2], skipped[skipped >= steps / 2]
    if not early.size or not late.size:
        raise ValueError(f"interval {interval} over {steps} steps skips no step in one half of sampling")
    return mean_interval((_mean_over(part, late) - _mean_over(part, early)).to_numpy())


def growth_by_interval(samples: pd.DataFrame, warmup_steps: int = 1) -> dict[int, Interval]:
    """`growth_with_step` for every interval that skips steps in both halves of sampling (others left out)."""
    steps = int(samples["step"].max()) + 1
    return {int(n): growth_with_step(samples, int(n), warmup_steps) for n in sorted(samples["interval"].unique())
            if any(i < steps / 2 for i in skipped_steps(steps, int(n), warmup_steps))
            and any(i >= steps / 2 for i in skipped_steps(steps, int(n), warmup_steps))}
