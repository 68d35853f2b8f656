"""One function per figure: data in, matplotlib Figure out (saving is analysis.style.save)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from analysis import style

__all__ = [
    "image_grid",
    "activation_violins",
    "error_bounds",
    "caching_error",
    "compensation_ablation",
]


def image_grid(images: np.ndarray, title: str, nrow: int = 10) -> plt.Figure:
    """(N, H, W, C) uint8 images as one grid."""
    from modiff.utils.images import make_grid

    style.apply()
    grid = make_grid(images, nrow=nrow)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def activation_violins(df: pd.DataFrame, x: str = "step", sharey: bool = True, title: str = "") -> plt.Figure:
    """Figure 1b: violins over steps of raw activations (left) and temporal differences (right).

    ``df``: long (step, t, kind, value) rows as from `analysis.distributions.violin_data`. With
    ``sharey`` both panels share the y axis, so the narrower differences show at a glance.
    """
    style.apply()
    kinds = [k for k in ("raw", "diff") if k in set(df["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 3.8), sharey=sharey, squeeze=False)
    labels = {"raw": "activations $a_t$", "diff": "differences $a_t - a_{t+1}$"}
    for ax, kind, color in zip(axes[0], kinds, style.PALETTE):
        part = df[df["kind"] == kind]
        sns.violinplot(data=part, x=x, y="value", ax=ax, color=color, cut=0, inner=None,
                       density_norm="width", linewidth=0.6)
        ax.set(title=labels[kind], xlabel="sampling step (0 = pure noise)" if x == "step" else x,
               ylabel="value (unitless)")
        _thin_ticks(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _thin_ticks(ax: plt.Axes, max_ticks: int = 12) -> None:
    """Keep at most ``max_ticks`` category labels on the x axis."""
    ticks, labels = ax.get_xticks(), ax.get_xticklabels()
    every = max(1, int(np.ceil(len(ticks) / max_ticks)))
    ax.set_xticks(ticks[::every], [lab.get_text() for lab in labels[::every]])


def _positive(values: pd.Series) -> np.ndarray:
    """Values for a log axis: zeros and negatives (exact steps) become NaN (gaps)."""
    v = values.to_numpy(dtype=float)
    return np.where(v > 0, v, np.nan)


def error_bounds(df: pd.DataFrame, title: str = "") -> plt.Figure:
    """Squared output error over steps with Theorem 4.4's bounds (printed and unrolled), log y.

    ``df``: `analysis.bounds.bound_table`. Left: no compensation vs (30); right: MoDiff vs (31).
    """
    style.apply()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    panels = (("err_sq_noec", "30", "c30", "without compensation"),
              ("err_sq_ec", "31", "c31", "with compensation (MoDiff)"))
    for ax, (err, eq, c, label) in zip(axes, panels):
        step = df["step"]
        ax.plot(step, _positive(df[err]), color="black", marker="o", ms=3, label="actual $||o_t - \\hat o_t||^2$")
        ax.plot(step, _positive(df[f"bound{eq}_printed"]), ls="--", label=f"({eq}) as printed")
        ax.plot(step, _positive(df[f"bound{eq}_unrolled"]), ls="-.", label=f"({eq}) unrolled")
        ax.set(yscale="log", xlabel="sampling step (0 = pure noise)", title=f"{label}, c = {float(df[c].iloc[0]):.3g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    axes[0].set_ylabel("squared output error ||o - o_hat||^2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _curves(ax: plt.Axes, part: pd.DataFrame, log: bool = False, band_alpha: float = 0.15, **kwargs: object) -> None:
    """Mean curve with a +-1 std band over samples, cut at 0 (a distance is never negative; on a log axis,
    zeros and a zero band edge are gaps)."""
    x, mean, std = part["step"], part["rel_l2_mean"], part["rel_l2_std"]
    lower, upper = (mean - std).clip(lower=0.0), mean + std
    if log:
        mean, lower, upper = _positive(mean), _positive(lower), _positive(upper)
    (line,) = ax.plot(x, mean, **kwargs)
    ax.fill_between(x, lower, upper, color=line.get_color(), alpha=band_alpha, linewidth=0)


def caching_error(df: pd.DataFrame, timesteps: Sequence[int], title: str = "Caching error (middle-block features)",
                  warmup_steps: int = 1) -> plt.Figure:
    """Figure 1a: relative L2 feature distance over steps, one line per refresh interval N through every
    step's mean (no smoothing), a +-1 std band over samples, a filled marker on each step where that N
    refreshes, and a dotted line at the last step every N skips with a new input (where
    `analysis.caching.caching_summary` compares them).

    ``df``: `analysis.network.caching_error_curves` (step, interval, rel_l2_mean, rel_l2_std), sampled on
    ``timesteps``.
    """
    from analysis.caching import last_informative_common_skip, refresh_steps

    style.apply()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = int(df["step"].max()) + 1
    intervals = sorted(int(n) for n in df["interval"].unique())
    for n, color in zip(intervals, style.PALETTE):
        part = df[df["interval"] == n].sort_values("step")
        _curves(ax, part, color=color, lw=1.2, label=f"N = {n}", band_alpha=0.08)
        refresh = part[part["step"].isin(refresh_steps(steps, n, warmup_steps))]
        ax.scatter(refresh["step"], refresh["rel_l2_mean"], color=color, s=18, zorder=3)
    common = last_informative_common_skip(intervals, timesteps, warmup_steps)
    if common is not None:
        ax.axvline(common, color="grey", ls=":", lw=1, label=f"step {common}: every N skips a new input")
    ax.set(xlabel="sampling step (dots: refresh steps)", ylabel=style.REL_L2_LABEL, title=title)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="refresh every", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def compensation_ablation(df: pd.DataFrame, log: bool = True,
                          title: str = "Error compensation (middle-block features)") -> plt.Figure:
    """Figure 3: relative L2 feature distance over steps per activation bit width; solid with error
    compensation, dashed without. ``df``: `analysis.network.compensation_ablation`."""
    style.apply()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for b in sorted(df["bits"].unique(), reverse=True):
        color = style.bits_color(b)
        for ec, ls in ((True, "-"), (False, "--")):
            part = df[(df["bits"] == b) & (df["compensation"] == ec)].sort_values("step")
            if len(part):
                _curves(ax, part, log=log, color=color, ls=ls, label=f"A{b} {'with' if ec else 'without'} EC")
    ax.set(xlabel="sampling step (0 = pure noise)", ylabel=style.REL_L2_LABEL, title=title,
           yscale="log" if log else "linear")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="solid: EC, dashed: none")
    return fig
