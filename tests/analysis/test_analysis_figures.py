"""Smoke tests: every analysis figure builds from small synthetic data."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis import figures
from analysis.bounds import bound_table
from analysis.distributions import violin_data


def _curve_frame(key: str, values: list, steps: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"step": i, key: v, "rel_l2_mean": 0.0 if i == 0 else 0.01 * (k + 1) * i, "rel_l2_std": 0.002 * rng.random()}
            for k, v in enumerate(values) for i in range(steps)]
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_activation_violins() -> None:
    acts = torch.randn(5, 2, 3, 4, 4) * 3 + torch.arange(5.0).view(5, 1, 1, 1, 1)
    fig = figures.activation_violins(violin_data(acts, max_per_step=50), title="layer x")
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2


def test_error_bounds() -> None:
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
    inputs = [torch.ones(1, 4) if 10 - i <= 3 else torch.zeros(1, 4) for i in range(10)]
    table = bound_table(inputs, layer, lambda x: (1 - math.sqrt(0.1)) * x)
    fig = figures.error_bounds(table, title="counterexample")
    assert len(fig.axes) == 2 and all(ax.get_yscale() == "log" for ax in fig.axes)


def test_caching_error_marks_refresh_steps() -> None:
    """One line per N through every step, a dot per refresh step (N = 2 over 6 steps: 0, 2, 4; N = 3: 0, 3),
    and a dotted line at the last step every N skips with a new input: 5, or 1 where the timestep at 5 is the
    one at 4 and 3 (N = 2 and 3 would reuse an output of the same input there)."""
    fig = figures.caching_error(_curve_frame("interval", [2, 3]), timesteps=[50, 40, 30, 20, 10, 0])
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3 and len(lines[0].get_xdata()) == 6
    assert list(lines[2].get_xdata()) == [5, 5] and lines[2].get_linestyle() == ":"
    dots = [c.get_offsets()[:, 0].tolist() for c in fig.axes[0].collections if len(c.get_offsets()) and c.get_sizes().size]
    assert [0.0, 2.0, 4.0] in dots and [0.0, 3.0] in dots
    repeated = figures.caching_error(_curve_frame("interval", [2, 3]), timesteps=[50, 40, 30, 0, 0, 0])
    assert list(repeated.axes[0].get_lines()[2].get_xdata()) == [1, 1]


def test_spread_band_stops_at_zero() -> None:
    """A distance is never negative: a std larger than the mean does not draw the band below 0."""
    wide = _curve_frame("interval", [2]).assign(rel_l2_std=0.5)
    fig = figures.caching_error(wide, timesteps=range(6, 0, -1))
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == 0.0 and band[:, 1].max() == pytest.approx(wide.rel_l2_mean.max() + 0.5)


def test_compensation_ablation() -> None:
    df = pd.concat([_curve_frame("bits", [8, 4]).assign(compensation=ec) for ec in (True, False)])
    fig = figures.compensation_ablation(df)
    styles = [line.get_linestyle() for line in fig.axes[0].get_lines()]
    assert len(styles) == 4 and styles.count("--") == 2


def test_a_bit_width_has_one_colour_in_every_figure() -> None:
    """Figure 3 and the per-layer c figure colour A4 alike (and A8), whatever other widths they show."""
    from analysis import style, theory_figures

    df = pd.concat([_curve_frame("bits", [8, 4]).assign(compensation=ec) for ec in (True, False)])
    lines = {line.get_label(): line.get_color() for line in figures.compensation_ablation(df).axes[0].get_lines()}
    c_table = pd.DataFrame({"layer": ["a", "b"] * 3, "quantizer": "per-sample", "bits": [3, 3, 4, 4, 8, 8],
                            "c31": [0.6, 0.5, 0.2, 0.1, 0.01, 0.02]})
    points = {c.get_label(): tuple(c.get_facecolor()[0][:3]) for c in theory_figures.c_per_layer(c_table).axes[0].collections}
    for bits in (8, 4):
        assert tuple(lines[f"A{bits} with EC"]) == style.bits_color(bits) == pytest.approx(points[f"A{bits}"])
    assert len(set(style.BITS_COLORS.values())) == len(style.BITS_COLORS)
    with pytest.raises(ValueError, match="no colour for 5 bits"):
        style.bits_color(5)
