"""Per-step statistics of one layer's activations and of their temporal differences (Figure 1b).

Input: the activations of ONE layer at every sampling step, in sampling order (the first entry is the
first model call, paper step t = T), as a sequence of tensors/arrays or one (steps, ...) tensor/array.
Every statistic is taken over all elements of a step (batch included).

Notation:

==============  ======================================================================================
``i``           sampling index 0..n-1 (column ``step``); paper step t = T - i with T = n
``t``           the diffusion timestep of the step, if given (column ``t``; NaN otherwise)
``a_i``         the layer's activation at sampling index i
``kind``        ``raw``: a_i itself; ``diff``: the temporal difference a_i - a_{i-1} (current minus
                previous call; the paper's a_t - a_{t+1}), defined for i >= 1
``range``       max - min over the elements of one step
``qX``          the X-quantile, e.g. ``q0.001`` the 0.1% quantile
``outlier_Kstd``  fraction of elements with |x - mean| > K std
``ratio``       range(raw) / range(diff) at one step (the paper claims > 10x)
==============  ======================================================================================

`trajectory_range_ratios` takes the same ratio within each trajectory (the leading dimension of a step's
tensor) instead of over the pooled batch, so the ratio gets an interval over trajectories.

Where a spacing repeats a timestep (``quad`` at 100 steps ends with t = 0 four times and t = 2 twice), DDIM
from t to the same t returns its input up to rounding, so a_i - a_{i-1} there is rounding noise and the
ratio is huge: the ratios leave such steps out (`repeated_timestep_steps`) when the timesteps are given.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from analysis.intervals import Interval, mean_interval

__all__ = [
    "DEFAULT_QUANTILES",
    "evenly_spaced_steps",
    "repeated_timestep_steps",
    "Activations",
    "activation_stats",
    "iter_steps",
    "layer_range_ratios",
    "pooled_median_interval",
    "range_ratio",
    "range_ratio_summary",
    "tensor_stats",
    "trajectory_range_ratios",
    "violin_data",
]

Activations = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]]
"""One layer's activations over steps: a (steps, ...) tensor/array or a sequence of per-step tensors."""

DEFAULT_QUANTILES: tuple[float, ...] = (0.001, 0.01, 0.25, 0.5, 0.75, 0.99, 0.999)


def iter_steps(activations: Activations) -> Iterator[np.ndarray]:
    """The per-step activations as flat float64 numpy arrays, in sampling order."""
    if isinstance(activations, (torch.Tensor, np.ndarray)) and activations.ndim == 0:
        raise ValueError("activations must have a leading steps dimension, got a scalar")
    for a in activations:
        if isinstance(a, torch.Tensor):
            a = a.detach().to("cpu", torch.float64).numpy()
        yield np.asarray(a, dtype=np.float64).reshape(-1)


def _timestep(timesteps: Optional[Sequence[int]], i: int) -> float:
    if timesteps is None:
        return float("nan")
    if i >= len(timesteps):
        raise ValueError(f"timesteps has {len(timesteps)} entries but the activations have more steps")
    return float(timesteps[i])


def tensor_stats(
    x: np.ndarray, quantiles: Sequence[float] = DEFAULT_QUANTILES, outlier_k: Sequence[float] = (3.0,)
) -> dict[str, float]:
    """Range, moments, quantiles and outlier mass of the flat array ``x`` (see the module notation)."""
    if x.size == 0:
        raise ValueError("cannot take statistics of an empty activation")
    lo, hi = float(x.min()), float(x.max())
    mean, std = float(x.mean()), float(x.std())
    stats = {"min": lo, "max": hi, "absmax": max(abs(lo), abs(hi)), "range": hi - lo, "mean": mean, "std": std}
    for q, value in zip(quantiles, np.quantile(x, list(quantiles))):
        stats[f"q{q:g}"] = float(value)
    deviation = np.abs(x - mean)
    for k in outlier_k:
        stats[f"outlier_{k:g}std"] = float(np.mean(deviation > k * std)) if std > 0 else 0.0
    return stats


def activation_stats(
    activations: Activations,
    timesteps: Optional[Sequence[int]] = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    outlier_k: Sequence[float] = (3.0,),
) -> pd.DataFrame:
    """Long DataFrame, one row per (step, kind): columns step, t, kind, min, max, absmax, range, mean,
    std, one ``qX`` per quantile, one ``outlier_Kstd`` per K. ``diff`` rows start at step 1."""
    rows = []
    previous: Optional[np.ndarray] = None
    for i, a in enumerate(iter_steps(activations)):
        t = _timestep(timesteps, i)
        rows.append({"step": i, "t": t, "kind": "raw", **tensor_stats(a, quantiles, outlier_k)})
        if previous is not None:
            if previous.shape != a.shape:
                raise ValueError(f"step {i} has {a.size} elements, step {i - 1} had {previous.size}")
            rows.append({"step": i, "t": t, "kind": "diff", **tensor_stats(a - previous, quantiles, outlier_k)})
        previous = a
    if not rows:
        raise ValueError("no steps in the activations")
    return pd.DataFrame(rows)


def repeated_timestep_steps(timesteps: Optional[Sequence[int]]) -> frozenset[int]:
    """Sampling indices i >= 1 whose timestep equals step i - 1's (none without timesteps)."""
    if timesteps is None:
        return frozenset()
    return frozenset(i for i in range(1, len(timesteps)) if timesteps[i] == timesteps[i - 1])


def _difference_steps_kept(steps: int, timesteps: Optional[Sequence[int]]) -> np.ndarray:
    """(steps - 1,) bool over the differences i = 1..steps-1: False where step i repeats step i - 1's timestep."""
    if timesteps is not None and len(timesteps) < steps:
        raise ValueError(f"timesteps has {len(timesteps)} entries but the activations have {steps} steps")
    repeated = repeated_timestep_steps(timesteps)
    kept = np.array([i not in repeated for i in range(1, steps)])
    if not kept.any():
        raise ValueError("every step repeats the previous step's timestep: no temporal difference is informative")
    return kept


def range_ratio(stats: pd.DataFrame, column: str = "range") -> pd.DataFrame:
    """Per step: raw and diff value of ``column`` (``range`` or ``absmax``) and their ratio raw / diff.

    ``stats`` is the output of `activation_stats`; steps without a diff row (step 0) are dropped.
    """
    wide = stats.pivot_table(index=["step"], columns="kind", values=column, aggfunc="first")
    if "diff" not in wide:
        raise ValueError("range_ratio needs at least two steps (a diff row)")
    wide = wide.dropna(subset=["diff"])
    t = stats[stats["kind"] == "raw"].set_index("step")["t"]
    out = pd.DataFrame({"step": wide.index, "t": t.reindex(wide.index).to_numpy(),
                        "raw": wide["raw"].to_numpy(), "diff": wide["diff"].to_numpy()})
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio"] = out["raw"] / out["diff"]
    return out.reset_index(drop=True)


def range_ratio_summary(stats: pd.DataFrame) -> dict[str, float]:
    """Raw vs diff ranges overall: ``overall`` = (max over steps of max - min over steps of min) of raw
    divided by the same for diff (both over steps >= 1), and the smallest and the median per-step ratio. No mean:
    a step where a_t barely moves has a near-zero diff range, and its ratio alone would set the mean. Steps
    that repeat the previous step's timestep (column ``t``) are left out."""
    raw_t = stats[stats["kind"] == "raw"].set_index("step")["t"].sort_index()
    repeated = set(raw_t.index[1:][raw_t.to_numpy()[1:] == raw_t.to_numpy()[:-1]])
    stats = stats[~stats["step"].isin(repeated)]
    per_step = range_ratio(stats)
    steps = stats[stats["step"] >= 1]
    span = {k: steps.loc[steps["kind"] == k, "max"].max() - steps.loc[steps["kind"] == k, "min"].min()
            for k in ("raw", "diff")}
    ratios = per_step["ratio"].replace([np.inf], np.nan)
    return {
        "overall": float(span["raw"] / span["diff"]) if span["diff"] > 0 else float("inf"),
        "min_per_step": float(ratios.min()),
        "median_per_step": float(ratios.median()),
    }


def layer_range_ratios(activations: Activations, timesteps: Optional[Sequence[int]] = None) -> dict[str, float]:
    """One layer's row of Figure 1b's table: `range_ratio_summary` of the pooled batch with the interval of its
    median over steps (`pooled_median_interval`), and the per-trajectory median ratio (`trajectory_range_ratios`)
    as a mean over trajectories with its 95% bootstrap interval; all three without the steps that repeat a
    timestep (`repeated_timestep_steps`)."""
    per_trajectory = mean_interval(trajectory_range_ratios(activations, timesteps))
    pooled = pooled_median_interval(activations, timesteps=timesteps)
    return {**range_ratio_summary(activation_stats(activations, timesteps=timesteps)),
            "median_per_step_ci95_low": pooled.low, "median_per_step_ci95_high": pooled.high,
            "per_trajectory_median": per_trajectory.mean, "per_trajectory_ci95_low": per_trajectory.low,
            "per_trajectory_ci95_high": per_trajectory.high, "trajectories": per_trajectory.n,
            "repeated_t_steps_left_out": len(repeated_timestep_steps(timesteps))}


def _trajectory_extrema(activations: Activations, timesteps: Optional[Sequence[int]] = None) -> tuple[np.ndarray, ...]:
    """Per step i >= 1 that does not repeat step i - 1's timestep, and per trajectory (dimension 0 of every
    step's tensor): min and max of a_i and of a_i - a_{i-1} over that trajectory's elements, four
    (kept steps, trajectories) arrays."""
    extrema, previous = [], None
    for a in activations:
        a = torch.as_tensor(a).detach().to("cpu", torch.float64)
        if a.ndim < 1 or (previous is not None and a.shape != previous.shape):
            raise ValueError("every step needs the same shape with a leading trajectory dimension, got "
                             f"{tuple(a.shape)}" + ("" if previous is None else f" after {tuple(previous.shape)}"))
        if previous is not None:
            raw, diff = a.flatten(1), (a - previous).flatten(1)
            extrema.append(torch.stack([raw.amin(1), raw.amax(1), diff.amin(1), diff.amax(1)]))
        previous = a
    if not extrema:
        raise ValueError("the range ratios need at least two steps (one temporal difference)")
    kept = _difference_steps_kept(len(extrema) + 1, timesteps)
    raw_lo, raw_hi, diff_lo, diff_hi = torch.stack(extrema, dim=1).numpy()[:, kept]
    return raw_lo, raw_hi, diff_lo, diff_hi


def pooled_median_interval(activations: Activations, level: float = 0.95, resamples: int = 1000,
                           seed: int = 0, timesteps: Optional[Sequence[int]] = None) -> Interval:
    """`range_ratio_summary`'s ``median_per_step`` (the median over steps of range(a_i) / range(a_i - a_{i-1}),
    ranges over the whole batch) with a percentile bootstrap interval over trajectories: the batch resampled,
    each step's pooled ranges recomputed from the trajectories' extrema (a pooled range is the largest max
    minus the smallest min). Steps whose difference has range 0, and those that repeat a timestep, are left
    out, as there."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a percentile interval, got {resamples}")
    raw_lo, raw_hi, diff_lo, diff_hi = _trajectory_extrema(activations, timesteps)

    def median(chosen: np.ndarray) -> np.ndarray:  # chosen: (..., trajectories) indices -> (...) medians
        raw = raw_hi[:, chosen].max(-1) - raw_lo[:, chosen].min(-1)
        diff = diff_hi[:, chosen].max(-1) - diff_lo[:, chosen].min(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nanmedian(np.where(diff > 0, raw / diff, np.nan), axis=0)

    trajectories = raw_lo.shape[1]
    estimate = float(median(np.arange(trajectories)))
    draws = median(np.random.default_rng(seed).integers(0, trajectories, size=(resamples, trajectories)))
    low, high = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(estimate, float(low), float(high), trajectories, level)


def trajectory_range_ratios(activations: Activations, timesteps: Optional[Sequence[int]] = None) -> np.ndarray:
    """Per trajectory (dimension 0 of every step's tensor), the median over steps i >= 1 of
    range(a_i) / range(a_i - a_{i-1}), both ranges over that trajectory's elements only: one value per
    trajectory, the unit a mean interval resamples. Steps where a trajectory's difference has range 0, and
    steps that repeat a timestep, are left out of its median."""
    raw_lo, raw_hi, diff_lo, diff_hi = _trajectory_extrema(activations, timesteps)
    raw_range, diff_range = raw_hi - raw_lo, diff_hi - diff_lo
    with np.errstate(divide="ignore", invalid="ignore"):
        per_step = np.where(diff_range > 0, raw_range / diff_range, np.nan)  # (steps - 1, trajectories)
    still = np.flatnonzero(np.isnan(per_step).all(axis=0))
    if still.size:
        raise ValueError(f"trajectories {still.tolist()} never change from step to step (every difference has "
                         "range 0), so they have no ratio: check the recording (the same tensor at every step?)")
    return np.nanmedian(per_step, axis=0)


def evenly_spaced_steps(steps: int, count: int, timesteps: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """At most ``count`` sampling indices spread evenly over the steps that have an informative temporal
    difference (1..steps-1, both ends included, less those that repeat a timestep when ``timesteps`` are
    given): a readable subset for Figure 1b's violins."""
    if steps < 2 or count < 1:
        raise ValueError(f"need steps >= 2 and count >= 1, got steps={steps}, count={count}")
    candidates = np.flatnonzero(_difference_steps_kept(steps, timesteps)) + 1
    positions = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
    return tuple(sorted({int(candidates[int(round(p))]) for p in positions}))


def violin_data(
    activations: Activations,
    max_per_step: int = 2000,
    seed: int = 0,
    timesteps: Optional[Sequence[int]] = None,
    steps: Optional[Sequence[int]] = None,
) -> pd.DataFrame:
    """Long DataFrame (step, t, kind, value) of at most ``max_per_step`` values per step and kind, drawn
    without replacement by a generator seeded with ``seed`` (same input and seed, same rows).

    ``steps`` restricts the output to these sampling indices (the diff still uses the previous step).
    """
    if max_per_step < 1:
        raise ValueError(f"max_per_step must be >= 1, got {max_per_step}")
    rng = np.random.default_rng(seed)
    keep = None if steps is None else set(int(s) for s in steps)
    frames = []
    previous: Optional[np.ndarray] = None
    for i, a in enumerate(iter_steps(activations)):
        if keep is None or i in keep:
            kinds = [("raw", a)] + ([] if previous is None else [("diff", a - previous)])
            for kind, values in kinds:
                take = rng.choice(values.size, size=min(max_per_step, values.size), replace=False)
                frames.append(pd.DataFrame({"step": i, "t": _timestep(timesteps, i), "kind": kind,
                                            "value": values[np.sort(take)]}))
        previous = a
    if not frames:
        raise ValueError("no steps selected")
    return pd.concat(frames, ignore_index=True)
