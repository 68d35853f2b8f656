"""The layer sweep of Theorems 4.3/4.4: c from calibration seeds only, hand-computed c and bounds,
power-iteration operator norms, the 2c >= 1 flags, and agreement with the single-layer simulator."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis.bounds import bound_table
from analysis.propagation import (explicit_matrix, iter_simulation, linear_operator, operator_norm,
                                  theorem43_own_range_bound)
from analysis.theory_checks import bound_checks, decay_failures, estimate_c, findings, tightness_summary
from analysis.theory_sweep import (STAT_COLUMNS, SweepConfig, _LayerSimulator, operator_norms, quantizer_spec,
                                   select_layers, sweep_trajectories)



def _rows(role: str, seeds: list[int], rounding: dict[int, float], err_ec: float = 0.0, steps: int = 3,
          layer: str = "l", bits: int = 4) -> pd.DataFrame:
    """Hand-made sweep rows: residual ||r||^2 = 1 at every step, rounding error per seed."""
    rows = []
    for seed in seeds:
        for step in range(1, steps + 1):
            row = {"role": role, "layer": layer, "quantizer": "per-sample", "bits": bits, "seed": seed, "step": step,
                   "paper_t": steps + 1 - step, "t": 100 * (steps - step), "diff_sq": 1.0}
            row.update(dict.fromkeys(STAT_COLUMNS, 1.0))
            row.update(rounding_sq_noec=rounding[seed], rounding_sq_ec=rounding[seed], thm43_bound_noec=2.0,
                       thm43_bound_ec=2.0, thm43_printed_bound_noec=4.0, thm43_printed_bound_ec=4.0,
                       err_sq_noec=err_ec if role == "held-out" else math.nan,
                       err_sq_ec=err_ec if role == "held-out" else math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def test_out_of_sample_c_comes_from_the_calibration_seeds_only() -> None:
    """A quantizer that rounds seeds 0-1 with c = 0.1 and seeds 2-3 with c = 0.3: the out-of-sample
    bounds use 0.1 (calibration), the in-sample ones 0.3 (held-out), and the numbers follow by hand."""
    stats = pd.concat([_rows("calibration", [0, 1], {0: 0.1, 1: 0.05}),
                       _rows("held-out", [2, 3], {2: 0.3, 3: 0.2}, err_ec=0.5)], ignore_index=True)
    c_cal, c_held = estimate_c(stats, "calibration"), estimate_c(stats, "held-out")
    assert c_cal["c31"].item() == pytest.approx(0.1) and c_held["c31"].item() == pytest.approx(0.3)
    result = bound_checks(stats, {"l": 1.0})
    checks = result.per_step.set_index(["reading", "check", "step"])
    # step 3 (i = 3), d_j = 1 for j = 1..3: (31) unrolled = sum (2c)^(4-j) = (2c)^3 + (2c)^2 + 2c
    for reading, c in (("out-of-sample", 0.1), ("in-sample", 0.3)):
        bound = (2 * c) ** 3 + (2 * c) ** 2 + 2 * c
        assert checks.loc[(reading, "bound31_unrolled", 3), "ratio_max"] == pytest.approx(0.5 / bound, rel=1e-5)
        printed = 1 + 2 * c + (2 * c) ** 2  # (2c)^(j-1)
        assert checks.loc[(reading, "bound31_printed", 3), "ratio_max"] == pytest.approx(0.5 / printed, rel=1e-5)
    # out of sample the unrolled (31) fails at step 1 (0.5 > 2 * 0.1), in sample it holds (0.5 < 0.6)
    assert checks.loc[("out-of-sample", "bound31_unrolled", 1), "fails"] == 2
    assert checks.loc[("in-sample", "bound31_unrolled", 1), "fails"] == 0
    assert checks.loc[("out-of-sample", "thm43_ec", 1), "ratio_max"] == pytest.approx(0.15, rel=1e-5)
    summary = tightness_summary(result)
    text = findings(summary, result, c_cal, c_held)
    assert "c31 held-out > c31 calibration" in text and "In 1 of 1 cases" in text and "3x" in text
    assert "`thm43_own_ec` fails at 0 of 6 (0%) held-out trajectory-steps (largest error / bound 0.3)" in text
    assert checks.loc[("out-of-sample", "thm43_own_ec", 1), "ratio_max"] == pytest.approx(0.3, rel=1e-5)
    assert "`thm43_printed_ec` fails at 0 of 6 (0%) held-out trajectory-steps (largest error / bound 0.075)" in text
    assert text.index("thm43_printed_ec") < text.index("thm43_own_ec")  # the claim's form first
    # out of sample both held-out trajectories fail the unrolled (31) at all 3 steps (error 0.5 against
    # 0.2, 0.24, 0.248), the printed (31) at none (its first weight is (2c)^0 = 1: 0.5 against 1, 1.2, 1.24)
    rows = summary.set_index(["reading", "check"])
    unrolled, printed = rows.loc[("out-of-sample", "bound31_unrolled")], rows.loc[("out-of-sample", "bound31_printed")]
    assert (unrolled["fails"], unrolled["checks"], unrolled["trajectories"], unrolled["trajectories_failing"]) == (6, 6, 2, 2)
    assert unrolled["fail_rate"] == unrolled["fail_rate_ci95_low"] == unrolled["fail_rate_ci95_high"] == 1.0
    assert "fails at 6 of 6 (100%) held-out trajectory-steps" in text
    assert "in 2 of 2 trajectories; 95% interval of the rate over trajectories [100%, 100%]" in text
    assert printed["fail_rate_ci95_low"] == printed["fail_rate_ci95_high"] == printed["trajectories_failing"] == 0


def test_fail_rate_interval_is_over_trajectories() -> None:
    """The fail rate's interval resamples whole held-out trajectories (their steps are not independent):
    fails 0, 0 and 4 of 10 checks give the interval of the mean of 0, 0, 0.4; none failing gives [0, 0]."""
    from analysis.intervals import mean_interval
    from analysis.theory_checks import BoundChecks

    keys = {"reading": "out-of-sample", "quantizer": "per-sample", "bits": 3}
    per_step = pd.DataFrame([{**keys, "check": check, "layer": "l", "step": 1, "trajectories": 3, "fails": fails,
                              "ratio_max": 2.0 if fails else 0.5, "ratio_median": 0.1}
                             for check, fails in (("bound31_unrolled", 4), ("bound30_unrolled", 0))])
    per_step.loc[0, "trajectories"], per_step.loc[1, "trajectories"] = 30, 30  # 10 checks per trajectory
    per_trajectory = pd.DataFrame([{**keys, "check": check, "seed": seed, "checks": 10, "fails": fails}
                                   for check, by_seed in (("bound31_unrolled", (0, 0, 4)), ("bound30_unrolled", (0, 0, 0)))
                                   for seed, fails in zip((5, 6, 7), by_seed)])
    summary = tightness_summary(BoundChecks(per_step, per_trajectory), resamples=1000).set_index("check")
    expected = mean_interval([0.0, 0.0, 0.4], resamples=1000)
    failing = summary.loc["bound31_unrolled"]
    assert failing["fail_rate"] == pytest.approx(4 / 30) == pytest.approx(expected.mean)
    assert (failing["fail_rate_ci95_low"], failing["fail_rate_ci95_high"]) == (expected.low, expected.high)
    assert failing["trajectories_failing"] == 1 and failing["trajectories"] == 3
    holding = summary.loc["bound30_unrolled"]
    assert holding["fail_rate_ci95_low"] == holding["fail_rate_ci95_high"] == 0.0 and holding["trajectories_failing"] == 0


def test_decay_flags_and_their_list() -> None:
    stats = pd.concat([_rows("calibration", [0, 1], {0: 0.5, 1: 0.3}, bits=3), _rows("calibration", [0], {0: 1.2}, bits=2),
                       _rows("calibration", [0], {0: 0.49}, bits=4)], ignore_index=True)
    c = estimate_c(stats).set_index("bits")
    assert c.loc[3, "two_c31_ge_1"] and not c.loc[3, "c31_ge_1"]
    assert c.loc[2, "two_c31_ge_1"] and c.loc[2, "c31_ge_1"] and not c.loc[4, "two_c31_ge_1"]
    flagged = decay_failures(c.reset_index())
    assert flagged["bits"].tolist() == [2, 3] and flagged["growth"].tolist() == pytest.approx([2.4, 1.0])
    assert flagged["trajectories"].tolist() == [1, 2] and flagged["steps"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="no rows with role 'held-out'"):
        estimate_c(stats, "held-out")


def test_power_iteration_norm_matches_the_unrolled_matrix() -> None:
    torch.manual_seed(0)
    for conv, shape in ((nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 6)), (nn.Conv2d(4, 2, 3, stride=2, padding=1), (1, 4, 8, 8)),
                        (nn.Conv1d(2, 3, 5, padding=2), (1, 2, 9))):
        exact = float(torch.linalg.matrix_norm(explicit_matrix(linear_operator(conv), shape), ord=2))
        assert operator_norm(conv, input_shape=shape) == pytest.approx(exact, rel=1e-7)


def test_operator_norms_cached_per_layer(tmp_path, tiny_denoiser) -> None:
    net = tiny_denoiser
    layers = select_layers(net)
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    cache = tmp_path / "norms.json"
    norms = operator_norms(net, layers[:3], cache=cache)
    assert len(cache.read_text().splitlines()) == 5  # three keys between the braces
    with torch.no_grad():  # a changed weight is a new cache key, not a stale norm
        net.get_submodule(layers[2]).weight.mul_(2)
    again = operator_norms(net, layers[:3], cache=cache)
    assert again[layers[2]] == pytest.approx(2 * norms[layers[2]]) and again[layers[0]] == norms[layers[0]]
    with pytest.raises(ValueError, match="not Conv1d/Conv2d/Linear"):
        select_layers(net, ["net"])


def test_simulator_matches_the_single_layer_simulation() -> None:
    """Per trajectory, the streaming simulator gives the errors and c_i of `analysis.bounds.bound_table`."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, xs = torch.randn(2, 3, 6, 6), []
    for _ in range(6):
        x = x + 0.3 * torch.randn_like(x)
        xs.append(x.clone())
    spec = quantizer_spec("per-sample", 3)
    sim = _LayerSimulator(linear_operator(conv), [spec, quantizer_spec("per-tensor", 3)], True, torch.float64)
    for a in xs:
        sim(a)
    data = sim.result()  # (5, 9, 2, 2)
    for s in range(2):
        table = bound_table([a[s:s + 1] for a in xs], conv, spec).iloc[1:]
        cols = {c: data[:, 1 + i, 0, s] for i, c in enumerate(STAT_COLUMNS)}
        np.testing.assert_allclose(cols["err_sq_ec"], table["err_sq_ec"], rtol=1e-9)
        np.testing.assert_allclose(cols["err_sq_noec"], table["err_sq_noec"], rtol=1e-9)
        np.testing.assert_allclose(cols["rounding_sq_ec"] / cols["residual_sq_ec"], table["c_t_ec"], rtol=1e-9)
        np.testing.assert_allclose(data[:, 0, 0, s], table["diff_sq"], rtol=1e-12)
        assert (cols["rounding_sq_ec"] <= cols["thm43_bound_ec"]).all()
    # per tensor: one scale for both samples, so Theorem 4.3's per-sample bounds share s^2 / 4 per element
    bound = data[:, 1 + STAT_COLUMNS.index("thm43_bound_ec"), 1]
    np.testing.assert_allclose(bound[:, 0], bound[:, 1], rtol=1e-12)


def _residuals(xs: list[torch.Tensor], conv: nn.Module, spec, method: str) -> list[torch.Tensor]:
    return [rec.residual for rec in iter_simulation(xs, conv, spec, method)][1:]


def test_own_range_bounds_are_theorem43_in_the_residuals_own_range() -> None:
    """The ``thm43_own_bound_*`` columns equal `theorem43_own_range_bound` of the residual the quantizer took its
    range from: the sample's (per-sample), or the batch's with each sample's share of its values (per tensor). The
    ``thm43_printed_bound_*`` columns are the printed s^2 d: the same with floor rounding, four times the quarter."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, xs = torch.randn(2, 3, 5, 5), []
    for _ in range(5):
        x = x + 0.3 * torch.randn_like(x) + 1.5  # drifting: the residuals' ranges hold no 0
        xs.append(x.clone())
    specs = [quantizer_spec("per-sample", 3), quantizer_spec("per-tensor", 3)]
    sim = _LayerSimulator(linear_operator(conv), specs, False, torch.float64)
    for a in xs:
        sim(a)
    data = sim.result()
    own = {m: data[:, 1 + STAT_COLUMNS.index(f"thm43_own_bound_{m}")] for m in ("noec", "ec")}  # (steps, K, B)
    printed = {m: data[:, 1 + STAT_COLUMNS.index(f"thm43_printed_bound_{m}")] for m in ("noec", "ec")}
    for m, method in (("noec", "modulated"), ("ec", "modiff")):
        for s in range(2):
            sample = _residuals([a[s:s + 1] for a in xs], conv, specs[0], method)
            np.testing.assert_allclose(own[m][:, 0, s], [theorem43_own_range_bound(r, specs[0]) for r in sample],
                                       rtol=1e-12)
            floor = replace(specs[0], rounding="floor")
            np.testing.assert_allclose(printed[m][:, 0, s], [theorem43_own_range_bound(r, floor) for r in sample],
                                       rtol=1e-12)
        batch = _residuals(xs, conv, specs[1], method)
        expected = [theorem43_own_range_bound(r, specs[1]) / 2 for r in batch]
        np.testing.assert_allclose(own[m][:, 1, 0], expected, rtol=1e-12)
        np.testing.assert_allclose(own[m][:, 1, 1], expected, rtol=1e-12)
        np.testing.assert_allclose(printed[m][:, 1], 4 * own[m][:, 1], rtol=1e-12)
    widened = data[:, 1 + STAT_COLUMNS.index("thm43_bound_noec"), 0]  # the quantizer's range widened to 0
    assert (own["noec"][:, 0] < widened / 1.5).all()


def test_cases_whose_inputs_do_not_depend_on_the_seed_are_counted_apart() -> None:
    """A layer fed by t alone (every trajectory the same) next to the layer above: flagged, and the
    finding gives the out-of-sample counts without it (6 of 6 fail where all cases give 6 of 12)."""
    stats = pd.concat([_rows("calibration", [0, 1], {0: 0.1, 1: 0.05}),
                       _rows("held-out", [2, 3], {2: 0.3, 3: 0.2}, err_ec=0.5),
                       _rows("calibration", [0, 1], {0: 0.1, 1: 0.1}, layer="temb"),
                       _rows("held-out", [2, 3], {2: 0.1, 3: 0.1}, layer="temb")], ignore_index=True)
    result = bound_checks(stats, {"l": 1.0, "temb": 1.0})
    flags = result.per_step.groupby("layer")["seed_independent"].agg(["all", "any"])
    assert flags.loc["temb"].tolist() == [True, True] and flags.loc["l"].tolist() == [False, False]
    c_cal, c_held = estimate_c(stats, "calibration"), estimate_c(stats, "held-out")
    text = findings(tightness_summary(result), result, c_cal, c_held)
    assert "`bound31_unrolled` fails at 6 of 12 (50%)" in text
    assert "1 of 2 cases have inputs that do not depend on the seed" in text
    assert "Without them, out of sample: `bound30_unrolled` 2 of 6 (33%); `bound31_unrolled` 6 of 6 (100%)" in text
    alone = bound_checks(stats[stats["layer"] == "l"], {"l": 1.0})
    assert "Every one of the 1 cases has inputs that depend on the seed" in findings(
        tightness_summary(alone), alone, estimate_c(stats[stats["layer"] == "l"]),
        estimate_c(stats[stats["layer"] == "l"], "held-out"))


def test_sweep_on_a_tiny_unet_separates_the_seeds(tiny_denoiser) -> None:
    net = tiny_denoiser
    layers = select_layers(net)[:4]
    config = SweepConfig(bits=(4, 3), steps=4, batch_size=2, layers_per_pass=3)
    stats = sweep_trajectories(net, layers, [0, 1, 2], [5, 6], config)
    assert set(stats["layer"]) == set(layers) and len(stats) == (3 + 2) * 4 * 2 * 2 * 3  # seeds x layers x q x b x steps
    cal, held = stats[stats["role"] == "calibration"], stats[stats["role"] == "held-out"]
    assert set(cal["seed"]) == {0, 1, 2} and set(held["seed"]) == {5, 6}
    assert cal["err_sq_ec"].isna().all() and held["err_sq_ec"].notna().all()
    checks = bound_checks(stats, operator_norms(net, layers)).per_step
    assert (checks.loc[checks["reading"] == "in-sample", "check"].str.endswith("unrolled")
            | checks.loc[checks["reading"] == "in-sample", "check"].str.endswith("printed")).all()
    in_unrolled = checks[(checks["reading"] == "in-sample") & checks["check"].str.endswith("unrolled")]
    assert in_unrolled["fails"].sum() == 0  # by construction
    flagged = set(checks.loc[checks["seed_independent"], "layer"])
    assert flagged and flagged == {layer for layer in layers if "temb" in layer}  # fed by t alone
    assert checks.loc[checks["check"].str.startswith("thm43"), "fails"].sum() == 0
    with pytest.raises(ValueError, match="disjoint"):
        sweep_trajectories(net, layers, [0, 1], [1, 2], config)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        SweepConfig(quantizers=("per-channel",))
