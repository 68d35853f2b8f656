"""The vectorized theory sweep and bound checks against the per-configuration computations they replace:
equal bit for bit on small cases (stacked simulator states, all cases of the bound checks at once)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis.bounds import BOUNDS, theorem44_bounds
from analysis.propagation import linear_operator
from analysis.theory_checks import _ratio, bound_checks, estimate_c
from analysis.theory_sweep import STAT_COLUMNS, _LayerSimulator, quantizer_spec
from modiff.quant.primitives import QuantSpec, fake_quantize, qparams_from_range, reduce_range

SPECS = [quantizer_spec(q, b) for q in ("per-sample", "per-tensor") for b in (8, 4, 3)]


def _per_sample(step: torch.Tensor, r: torch.Tensor, per_element: float = 0.25) -> torch.Tensor:
    """Sum of step^2 * per_element over each sample's elements, for a step per qparam group."""
    mean_sq = step.to(r.dtype).expand(r.shape[0], *step.shape[1:]).flatten(1).square().mean(1)
    return mean_sq * (r[0].numel() * per_element)


def _reference_step(r: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, ...]:
    """Q(r) and the per-sample Theorem 4.3 bounds (the quantizer's scale, the data's own range, and that range's
    printed s^2 d) of one configuration, as the sweep computes them."""
    x_min, x_max = reduce_range(r, spec)
    scale, zero_point = qparams_from_range(x_min, x_max, spec)
    own_step = (x_max - x_min) / (2**spec.bits - 1)
    return (fake_quantize(r, scale, zero_point, spec), _per_sample(scale, r), _per_sample(own_step, r),
            _per_sample(own_step, r, per_element=1.0))


def _reference(op, inputs: list[torch.Tensor], dtype: torch.dtype) -> np.ndarray:
    """(steps, 1 + len(STAT_COLUMNS), K, B), one configuration at a time."""
    op = op.to(dtype)
    per_spec = []
    for spec in SPECS:
        a_prev = inputs[0].to(dtype)
        a_hat, acc, rows = a_prev.clone(), torch.zeros_like(a_prev), []
        for a in inputs[1:]:
            a = a.to(dtype)
            diff = a - a_prev
            q, bound_noec, own_noec, printed_noec = _reference_step(diff, spec)
            delta_noec, r = diff - q, a - a_hat
            q, bound_ec, own_ec, printed_ec = _reference_step(r, spec)
            delta_ec, a_hat, acc = r - q, a_hat + q, acc + delta_noec
            err = op(torch.cat([acc, delta_ec]), with_bias=False).flatten(1).square().sum(1).chunk(2)
            sq = [x.flatten(1).square().sum(1) for x in (diff, delta_noec, r, delta_ec)]
            rows.append(torch.stack([sq[0], sq[0], sq[1], bound_noec, own_noec, printed_noec, err[0], sq[2], sq[3],
                                     bound_ec, own_ec, printed_ec, err[1]]))
            a_prev = a
        per_spec.append(torch.stack(rows))
    return torch.stack(per_spec, dim=2).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stacked_simulator_equals_one_configuration_at_a_time(dtype: torch.dtype, layout: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    x, inputs = torch.randn(3, 4, 6, 6), []
    for _ in range(6):
        x = x + 0.3 * torch.randn_like(x)
        inputs.append(x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.clone())
    sim = _LayerSimulator(linear_operator(conv), SPECS, True, dtype)
    for a in inputs:
        sim(a)
    np.testing.assert_array_equal(sim.result(), _reference(linear_operator(conv), inputs, dtype))


def test_stacked_simulator_refuses_configurations_it_cannot_stack() -> None:
    mixed = [quantizer_spec("per-sample", 4), QuantSpec(bits=4, rounding="floor", granularity="sample")]
    with pytest.raises(ValueError, match="share their rounding"):
        _LayerSimulator(linear_operator(nn.Linear(3, 2)), mixed, False, torch.float32)
    with pytest.raises(ValueError, match="per sample or per tensor"):
        _LayerSimulator(linear_operator(nn.Linear(3, 2)), [QuantSpec(bits=4, granularity="channel")], False,
                        torch.float32)


def _random_stats(seed: int = 0, steps: int = 5) -> pd.DataFrame:
    """Sweep-shaped rows for 2 layers x 2 bit widths, 2 calibration and 3 held-out seeds, some d = 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for role, seeds in (("calibration", [0, 1]), ("held-out", [5, 6, 7])):
        for layer in ("a", "b"):
            for bits in (4, 3):
                for step in range(1, steps + 1):
                    for s in seeds:
                        values = dict(zip(STAT_COLUMNS, rng.random(len(STAT_COLUMNS)) * 10.0 ** rng.integers(-3, 2)))
                        values.update(rounding_sq_ec=values["residual_sq_ec"] * rng.random() * (3 if bits == 3 else 0.4))
                        if role == "calibration":
                            values.update(err_sq_noec=np.nan, err_sq_ec=np.nan)
                        rows.append({"role": role, "layer": layer, "quantizer": "per-sample", "bits": bits, "seed": s,
                                     "step": step, "paper_t": steps + 1 - step, "t": 10 * (steps - step),
                                     "diff_sq": 0.0 if (step == 2 and s == 6) else rng.random(), **values})
    return pd.DataFrame(rows)


def test_bound_checks_equal_the_per_case_per_trajectory_bounds() -> None:
    """Every row of bound_checks from `theorem44_bounds` on one trajectory at a time (n < 8 terms: numpy
    sums them in order, as bound_checks does)."""
    stats, norms = _random_stats(), {"a": 1.7, "b": 0.4}
    result = bound_checks(stats, norms)
    checks = result.per_step.set_index(["layer", "bits", "reading", "check", "step"]).sort_index()
    per_seed = result.per_trajectory.set_index(["reading", "check", "bits", "seed"])
    expected_fails: dict[tuple, int] = {}  # (reading, form, bits, seed): fails over both layers and all steps
    held = stats[stats["role"] == "held-out"]
    for reading, role in (("out-of-sample", "calibration"), ("in-sample", "held-out")):
        c = estimate_c(stats, role).set_index(["layer", "bits"])
        for (layer, bits), case in held.groupby(["layer", "bits"]):
            ratios = {form: [] for form in BOUNDS}
            for _, rows in case.sort_values("step").groupby("seed"):
                d = np.concatenate([[np.nan], rows["diff_sq"].to_numpy()])
                bounds = theorem44_bounds(d, c.loc[(layer, bits), "c30"], c.loc[(layer, bits), "c31"], norms[layer])
                for form in BOUNDS:
                    actual = rows["err_sq_noec" if form.startswith("bound30") else "err_sq_ec"].to_numpy()
                    ratios[form].append(_ratio(actual, bounds[form].to_numpy()[1:]))
            for form in BOUNDS:
                r = np.stack(ratios[form], axis=1)  # (steps, seeds)
                got = checks.loc[(layer, bits, reading, form)]
                np.testing.assert_array_equal(got["ratio_max"], r.max(axis=1))
                np.testing.assert_array_equal(got["ratio_median"], np.median(r, axis=1))
                np.testing.assert_array_equal(got["fails"], (r > 1).sum(axis=1))
                for seed, fails in zip(sorted(case["seed"].unique()), (r > 1).sum(axis=0)):
                    key = (reading, form, bits, seed)
                    expected_fails[key] = expected_fails.get(key, 0) + int(fails)
    assert checks["fails"].sum() > 0  # the 3-bit cases round worse than c allows out of sample
    for key, fails in expected_fails.items():
        assert per_seed.loc[key, "fails"] == fails and per_seed.loc[key, "checks"] == 2 * 5  # 2 layers x 5 steps


def test_bound_checks_refuse_incomplete_rows() -> None:
    stats = _random_stats()
    gap = stats.drop(stats.index[(stats["role"] == "held-out") & (stats["seed"] == 7) & (stats["step"] == 3)][:1])
    with pytest.raises(ValueError, match="one row per"):
        bound_checks(gap, {"a": 1.0, "b": 1.0})
    no_calibration = stats[~((stats["role"] == "calibration") & (stats["layer"] == "b"))]
    with pytest.raises(ValueError, match="no calibration rows for"):
        bound_checks(no_calibration, {"a": 1.0, "b": 1.0})
