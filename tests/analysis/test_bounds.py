"""Theorem 4.4 bounds (as printed and as unrolled from the proof) and the paper-brief counterexample."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from analysis.bounds import BOUNDS, bound_summary, bound_table, theorem44_bounds
from modiff.quant import QuantSpec

C = 0.1
T = 10


def _identity() -> nn.Linear:
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
    return layer


def _counterexample() -> list[torch.Tensor]:
    """Paper steps t = T..1 in sampling order (index i, t = T - i); a_t = (1,1,1,1) for t <= 3, else 0."""
    return [torch.ones(1, 4) if T - i <= 3 else torch.zeros(1, 4) for i in range(T)]


def _at(table, paper_t: int, column: str) -> float:
    return float(table.loc[table["paper_t"] == paper_t, column].iloc[0])


def test_counterexample_exact_numbers() -> None:
    """Q(x) = (1 - sqrt(c)) x, A = I, c = 0.1, T = 10, d = 4, first step exact (paper-brief section 3)."""
    table = bound_table(_counterexample(), _identity(), lambda x: (1 - math.sqrt(C)) * x)
    assert table.attrs["c31"] == pytest.approx(C, rel=1e-9) and table.attrs["op_norm"] == 1.0
    assert table.attrs["c31_below_half"]
    expected = {3: (0.4, 2.56e-4, 0.8), 1: (0.004, 2.56e-4, 0.032)}
    for paper_t, (err, printed, unrolled) in expected.items():
        assert _at(table, paper_t, "err_sq_ec") == pytest.approx(err, rel=1e-9)
        assert _at(table, paper_t, "bound31_printed") == pytest.approx(printed, rel=1e-9)
        assert _at(table, paper_t, "bound31_unrolled") == pytest.approx(unrolled, rel=1e-9)
    assert _at(table, 2, "err_sq_ec") == pytest.approx(0.04, rel=1e-9)  # c^2 ||a||^2: decays as c^(3-t)
    # (31) as printed fails at t = 3, 2, 1; the unrolled form holds everywhere
    summary = bound_summary(table).set_index("check")
    assert summary.loc["bound31_printed", "fail_paper_t"] == [3, 2, 1]
    assert not summary.loc["bound31_printed", "holds"]
    assert summary.loc["bound31_printed", "min_margin"] == pytest.approx(2.56e-4 - 0.4, rel=1e-9)
    assert summary.loc[["bound31_unrolled", "bound30_printed", "bound30_unrolled"], "holds"].all()
    # without compensation the one rounding error c ||a||^2 = 0.4 persists (random walk, one term)
    for paper_t, unrolled30 in ((3, 0.8), (2, 1.6), (1, 3.2)):
        assert _at(table, paper_t, "err_sq_noec") == pytest.approx(0.4, rel=1e-9)
        assert _at(table, paper_t, "bound30_printed") == pytest.approx(2**6 * C * 4, rel=1e-9)
        assert _at(table, paper_t, "bound30_unrolled") == pytest.approx(unrolled30, rel=1e-9)


def test_theorem44_bounds_by_hand() -> None:
    d = np.array([np.nan, 1.0, 2.0, 3.0])  # d_j = ||a_j - a_{j-1}||^2, sampling index j
    b = theorem44_bounds(d, c30=0.2, c31=0.1, op_norm=2.0)
    a2 = 4.0
    # i = 3 (paper t = 1, T = 4): j = 1, 2, 3
    assert b["bound30_printed"][3] == pytest.approx(a2 * 0.2 * (1 * 1 + 2 * 2 + 4 * 3))
    assert b["bound30_unrolled"][3] == pytest.approx(a2 * 0.2 * (8 * 1 + 4 * 2 + 2 * 3))
    assert b["bound31_printed"][3] == pytest.approx(a2 * (1 * 1 + 0.2 * 2 + 0.04 * 3))
    assert b["bound31_unrolled"][3] == pytest.approx(a2 * (0.008 * 1 + 0.04 * 2 + 0.2 * 3))
    assert (b.iloc[0] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2^j overflows for j > 1023: inf, no NaN, no warning
        long = theorem44_bounds(np.r_[np.nan, np.ones(1100)], 0.3, 0.3, 1.0)
    assert np.isinf(long["bound30_printed"].iloc[-1]) and not long.isna().any().any()
    assert np.isfinite(long[["bound31_printed", "bound31_unrolled"]].to_numpy()).all()


def test_unrolled_bounds_hold_on_a_conv_layer() -> None:
    """With c = max_t c_t the unrolled forms hold on any data; the summary reports every check."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, xs = torch.randn(2, 3, 6, 6), []
    for _ in range(12):
        x = x + 0.2 * torch.randn_like(x)
        xs.append(x.clone())
    table = bound_table(xs, conv, QuantSpec(bits=3, granularity="sample"), timesteps=list(range(990, -1, -90)))
    assert table["holds_bound30_unrolled"].all() and table["holds_bound31_unrolled"].all()
    assert table["thm43_holds_ec"].iloc[1:].all() and table["thm43_holds_direct"].iloc[1:].all()
    assert table["t"].tolist()[:2] == [990, 900]
    summary = bound_summary(table)
    assert list(summary["check"]) == ["thm43_direct", "thm43_noec", "thm43_ec", *BOUNDS]
    assert summary["steps"].tolist() == [12] + [11] * 6  # direct has no warm-up step
    assert table["c31"].iloc[0] == pytest.approx(table["c_t_ec"].max())
    override = bound_table(xs, conv, QuantSpec(bits=3, granularity="sample"), c=0.25, op_norm=3.0)
    assert override.attrs["c30"] == 0.25 and (override["op_norm"] == 3.0).all()
