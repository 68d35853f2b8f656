"""Per-step activation statistics, raw vs temporal differences, and violin subsamples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.distributions import (activation_stats, layer_range_ratios, pooled_median_interval, range_ratio,
                                    range_ratio_summary, repeated_timestep_steps, tensor_stats,
                                    trajectory_range_ratios, violin_data)


def _trajectory(steps: int = 4, shape: tuple[int, ...] = (2, 3, 5, 5)) -> torch.Tensor:
    """Large raw values, small step-to-step changes: (steps, *shape)."""
    g = torch.Generator().manual_seed(0)
    base = 5 * torch.randn(shape, generator=g)
    return torch.stack([base + 0.1 * i * torch.randn(shape, generator=g) for i in range(steps)])


def test_tensor_stats_known_values() -> None:
    x = np.arange(1001, dtype=np.float64) - 500.0  # -500..500
    stats = tensor_stats(x, quantiles=(0.25, 0.5), outlier_k=(1.0,))
    assert stats["min"] == -500 and stats["max"] == 500 and stats["absmax"] == 500 and stats["range"] == 1000
    assert stats["q0.25"] == -250 and stats["q0.5"] == 0
    assert stats["std"] == pytest.approx(x.std())
    assert stats["outlier_1std"] == pytest.approx(np.mean(np.abs(x) > x.std()))
    assert tensor_stats(np.zeros(5))["outlier_3std"] == 0.0


def test_activation_stats_raw_and_diff_rows() -> None:
    acts = _trajectory()
    df = activation_stats(acts, timesteps=[900, 600, 300, 0])
    assert list(df["kind"]) == ["raw", "raw", "diff", "raw", "diff", "raw", "diff"]
    row = df[(df["step"] == 2) & (df["kind"] == "diff")].iloc[0]
    diff = (acts[2] - acts[1]).double()
    assert row["max"] == pytest.approx(float(diff.max())) and row["min"] == pytest.approx(float(diff.min()))
    assert row["t"] == 300
    assert {"q0.001", "q0.999", "outlier_3std", "std", "absmax"} <= set(df.columns)
    # a list of per-step tensors gives the same frame as the stacked tensor
    assert df.equals(activation_stats(list(acts), timesteps=[900, 600, 300, 0]))


def test_range_ratio_per_step_and_overall() -> None:
    df = activation_stats(_trajectory())
    ratio = range_ratio(df)
    assert list(ratio["step"]) == [1, 2, 3]
    assert (ratio["ratio"] == ratio["raw"] / ratio["diff"]).all()
    assert (ratio["ratio"] > 10).all()
    summary = range_ratio_summary(df)
    assert summary["overall"] > 10 and summary["min_per_step"] == pytest.approx(ratio["ratio"].min())


def test_violin_data_is_bounded_and_seeded() -> None:
    acts = _trajectory()
    a = violin_data(acts, max_per_step=20, seed=3)
    assert len(a) == 20 * 7 and set(a["kind"]) == {"raw", "diff"}
    assert a.equals(violin_data(acts, max_per_step=20, seed=3))
    assert not a.equals(violin_data(acts, max_per_step=20, seed=4))
    sub = violin_data(acts, max_per_step=10_000, steps=[0, 3])
    assert set(sub["step"]) == {0, 3} and (sub["step"] == 3).sum() == 2 * acts[0].numel()
    diff_values = np.sort(sub.loc[(sub["step"] == 3) & (sub["kind"] == "diff"), "value"].to_numpy())
    np.testing.assert_allclose(diff_values, np.sort((acts[3] - acts[2]).double().flatten().numpy()))


def test_errors() -> None:
    with pytest.raises(ValueError, match="max_per_step"):
        violin_data(_trajectory(), max_per_step=0)
    with pytest.raises(ValueError, match="two steps"):
        range_ratio(activation_stats(_trajectory(steps=1)))
    with pytest.raises(ValueError, match="timesteps"):
        activation_stats(_trajectory(steps=3), timesteps=[1])


def test_evenly_spaced_steps_for_the_violins() -> None:
    """Steps 1..n-1 (those with a difference), ends included, at most ``count``; with timesteps, steps that
    repeat one are never shown."""
    from analysis.distributions import evenly_spaced_steps

    assert evenly_spaced_steps(100, 10) == (1, 12, 23, 34, 45, 55, 66, 77, 88, 99)
    assert evenly_spaced_steps(20, 8) == (1, 4, 6, 9, 11, 14, 16, 19)
    assert evenly_spaced_steps(3, 10) == (1, 2)
    assert evenly_spaced_steps(5, 10, [40, 30, 20, 20, 10]) == (1, 2, 4)  # step 3 repeats t = 20
    assert evenly_spaced_steps(6, 2, [50, 40, 30, 0, 0, 0]) == (1, 3)  # the last informative step ends the range
    with pytest.raises(ValueError, match="steps >= 2"):
        evenly_spaced_steps(1, 5)


def test_trajectory_range_ratios_hand_computed() -> None:
    """Trajectory 0: ratios 4/2 and 4/0 (left out), median 2. Trajectory 1: 2/2 and 4/2, median 1.5."""
    steps = [torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [1.0, 3.0]]),
             torch.tensor([[1.0, 5.0], [2.0, 6.0]])]
    np.testing.assert_allclose(trajectory_range_ratios(steps), [2.0, 1.5])
    row = layer_range_ratios(steps, timesteps=[20, 10, 0])
    assert row["trajectories"] == 2 and row["per_trajectory_median"] == pytest.approx(1.75)
    assert row["per_trajectory_ci95_low"] <= 1.75 <= row["per_trajectory_ci95_high"]
    assert row["median_per_step"] == pytest.approx(range_ratio_summary(activation_stats(steps))["median_per_step"])


def test_pooled_median_interval_resamples_trajectories() -> None:
    """Pooled over both trajectories of the hand-computed case: step 1 raw range 4, diff range 3 (4/3); step 2
    raw range 5, diff range 2 (2.5); median 1.92, as `range_ratio_summary` says. A resample of one trajectory
    twice gives that trajectory's own median (2, its step-2 difference having range 0; 1.5), a mixed one 1.92:
    the 95% interval runs from 1.5 to 2."""
    steps = [torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [1.0, 3.0]]),
             torch.tensor([[1.0, 5.0], [2.0, 6.0]])]
    pooled = pooled_median_interval(steps, resamples=200)
    assert pooled.mean == pytest.approx(range_ratio_summary(activation_stats(steps))["median_per_step"])
    assert pooled.low <= pooled.mean <= pooled.high and pooled.n == 2
    alone = [pooled_median_interval([s[i:i + 1] for s in steps], resamples=200).mean for i in (0, 1)]
    assert pooled.low == pytest.approx(min(alone)) and pooled.high == pytest.approx(max(alone))
    row = layer_range_ratios(steps)
    assert (row["median_per_step_ci95_low"], row["median_per_step_ci95_high"]) == (pooled.low, pooled.high)
    with pytest.raises(ValueError, match="resamples must be >= 100"):
        pooled_median_interval(steps, resamples=10)
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        pooled_median_interval(steps, level=1.0)
    with pytest.raises(ValueError, match="at least two steps"):
        pooled_median_interval(steps[:1])


def test_steps_that_repeat_a_timestep_are_left_out_of_every_ratio() -> None:
    """The hand-computed case with a step inserted after step 1 that repeats its timestep (the input again,
    plus rounding noise): every ratio equals the case without it; counted, its difference 2^-20 wide (ratio
    about 4e6) moves the pooled median."""
    steps = [torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [1.0, 3.0]]),
             torch.tensor([[1.0, 5.0], [2.0, 6.0]])]
    noise = 2.0 ** -20  # exact in float32 next to these values
    repeated = [steps[0], steps[1], steps[1] + torch.tensor([[noise, noise], [0.0, noise]]), steps[2]]
    timesteps = [20, 10, 10, 0]
    assert repeated_timestep_steps(timesteps) == {2} and repeated_timestep_steps(None) == frozenset()
    np.testing.assert_allclose(trajectory_range_ratios(repeated, timesteps), trajectory_range_ratios(steps), rtol=1e-5)
    with_repeat, without = layer_range_ratios(repeated, timesteps), layer_range_ratios(steps, [20, 10, 0])
    for key in ("median_per_step", "min_per_step", "per_trajectory_median", "median_per_step_ci95_high"):
        assert with_repeat[key] == pytest.approx(without[key], rel=1e-5), key
    assert without["median_per_step"] == pytest.approx(1.92, abs=0.01)  # counted without the timesteps:
    assert layer_range_ratios(repeated)["median_per_step"] == pytest.approx(2.5)  # median of 1.33, 4e6, 2.5
    with pytest.raises(ValueError, match="no temporal difference is informative"):
        trajectory_range_ratios(steps[:2], [10, 10])
    with pytest.raises(ValueError, match="timesteps has 2 entries"):
        trajectory_range_ratios(steps, [20, 10])


def test_trajectory_range_ratios_errors() -> None:
    with pytest.raises(ValueError, match="at least two steps"):
        trajectory_range_ratios([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"same shape .* got \(3, 3\) after \(2, 3\)"):
        trajectory_range_ratios([torch.zeros(2, 3), torch.zeros(3, 3)])
    frozen = [torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 3.0]])]
    with pytest.raises(ValueError, match=r"trajectories \[0\] never change from step to step"):
        trajectory_range_ratios(frozen)
