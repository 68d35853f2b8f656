"""One function per figure: data in, matplotlib Figure out (saving is analysis.style.save)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt

from analysis import style

__all__ = ["training_loss", "image_grid"]


def training_loss(log: pd.DataFrame, smooth: int = 10) -> plt.Figure:
    """Training loss (mean over each 100 iterations, and a rolling mean) against the iteration."""
    style.apply()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(log["step"], log["loss"], alpha=0.35, label="mean over 100 iterations")
    ax.plot(log["step"], log["loss"].rolling(smooth, min_periods=1).mean(), label=f"rolling mean ({smooth})")
    ax.set(xlabel="iteration", ylabel="eps MSE", yscale="log", title="fmnist-ddim training loss")
    ax.legend()
    return fig


def image_grid(images: np.ndarray, title: str, nrow: int = 10) -> plt.Figure:
    """(N, H, W, C) uint8 images as one grid."""
    from modiff.images import make_grid

    style.apply()
    grid = make_grid(images, nrow=nrow)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_axis_off()
    ax.set_title(title)
    return fig
