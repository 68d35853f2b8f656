"""Figures of the layer sweep of Theorems 4.3 and 4.4 (data in, Figure out; written by `style.save`)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import style

__all__ = ["c_per_layer", "tightness"]

_TITLES = {"bound30_printed": "(30) as printed, no compensation", "bound30_unrolled": "(30) unrolled, no compensation",
           "bound31_printed": "(31) as printed, MoDiff", "bound31_unrolled": "(31) unrolled, MoDiff"}


def tightness(checks: pd.DataFrame, reading: str = "out-of-sample") -> plt.Figure:
    """Measured error / Theorem 4.4 bound (worst held-out trajectory), distribution over layers and
    steps: one panel per bound, boxes per bit width and quantizer (whiskers 1% to 99%), log scale;
    above the dashed line at 1 the bound fails. ``checks``: the ``per_step`` rows of `analysis.theory_checks.bound_checks`."""
    import seaborn as sns

    style.apply()
    part = checks[(checks["reading"] == reading) & checks["check"].isin(list(_TITLES))].copy()
    tiny = 1e-12  # 0 errors (exact steps) drawn at the floor of the log axis
    part["ratio"] = part["ratio_max"].clip(lower=tiny).replace(np.inf, np.nan)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey=True)
    for ax, (check, title) in zip(axes.flat, _TITLES.items()):
        data = part[part["check"] == check]
        sns.boxplot(data=data, x="bits", y="ratio", hue="quantizer", ax=ax, whis=(1, 99), fliersize=1.5,
                    order=sorted(data["bits"].unique(), reverse=True), log_scale=True)
        ax.axhline(1.0, color="black", ls="--", lw=1)
        ax.set(title=title, xlabel="activation bits", ylabel="measured error / bound (ratio)")
        ax.legend(fontsize="small", title=None)
    fig.suptitle(f"Theorem 4.4 on every layer, held-out trajectories, c {reading}")
    fig.tight_layout()
    return fig


def c_per_layer(c_table: pd.DataFrame, column: str = "c31") -> plt.Figure:
    """The empirical c of every layer (x: layer in model order) per bit width, one panel per quantizer;
    lines at c = 1/2 (Theorem 4.4's decay assumption) and c = 1. ``c_table``: `theory_checks.estimate_c`."""
    style.apply()
    quantizers = list(dict.fromkeys(c_table["quantizer"]))
    fig, axes = plt.subplots(len(quantizers), 1, figsize=(11, 3.2 * len(quantizers)), sharex=True, squeeze=False)
    order = {name: i for i, name in enumerate(dict.fromkeys(c_table["layer"]))}
    for ax, quantizer in zip(axes[:, 0], quantizers):
        part = c_table[c_table["quantizer"] == quantizer]
        for bits, rows in part.groupby("bits", sort=True):
            ax.scatter(rows["layer"].map(order), rows[column], s=10, color=style.bits_color(bits), label=f"A{bits}")
        ax.axhline(0.5, color="black", ls="--", lw=1, label="c = 1/2")
        ax.axhline(1.0, color="black", ls=":", lw=1, label="c = 1")
        ax.set(yscale="log", ylabel=f"{column} (unitless)",
               title=f"{quantizer} quantizer: {column} = max over steps of ||r - Q(r)||^2 / ||r||^2")
        ax.legend(fontsize="small", ncol=6)
    axes[-1, 0].set_xlabel("layer (model order)")
    fig.tight_layout()
    return fig
