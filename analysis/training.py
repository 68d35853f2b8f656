"""Loss curves of a model folder written by `modiff train` (made after training, where matplotlib exists).

    python -m analysis.training data/fmnist-ldm   # -> data/fmnist-ldm/figures/training_loss.{png,pdf}

train_log.csv holds the eps MSE of the denoiser (step, loss, seconds); a latent model's folder also
holds autoencoder_log.csv (step, l1, kl, seconds), drawn in a second panel.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import pandas as pd

from analysis import style

__all__ = ["training_curves", "save_training_curves", "model_folder", "model_training_curves"]

_LOGS = ("train_log.csv", "autoencoder_log.csv")


def training_curves(folder: str | Path, smooth: int = 10) -> plt.Figure:
    """The denoiser's loss and, when present, the autoencoder's L1 against the iteration (log scale)."""
    folder = Path(folder)
    panels = [(_LOGS[0], "loss", "eps MSE", "denoiser"), (_LOGS[1], "l1", "L1", "autoencoder")]
    panels = [p for p in panels if (folder / p[0]).is_file()]
    if not panels:
        raise FileNotFoundError(f"{folder} holds neither train_log.csv nor autoencoder_log.csv")
    style.apply()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, (name, column, label, what) in zip(axes[0], panels):
        log = pd.read_csv(folder / name)
        ax.plot(log["step"], log[column], alpha=0.35, label="mean over 100 iterations")
        ax.plot(log["step"], log[column].rolling(smooth, min_periods=1).mean(), label=f"rolling mean ({smooth})")
        ax.set(xlabel="iteration", ylabel=label, yscale="log", title=f"{folder.name}: {what} training loss")
        ax.legend()
    return fig


def model_folder(model: str) -> Optional[Path]:
    """The folder of a preset name (data/<preset>) or of a folder path exported by `modiff train`; None for
    anything else (a checkpoint file has no training logs beside it)."""
    from modiff.models.registry import MODEL_PRESETS, data_dir

    folder = data_dir() / MODEL_PRESETS[model] if model in MODEL_PRESETS else Path(model)
    return folder if folder.is_dir() else None


def model_training_curves(model: str) -> Optional[plt.Figure]:
    """`training_curves` of a preset or exported folder; None when it holds no training log."""
    folder = model_folder(model)
    if folder is None or not any((folder / name).is_file() for name in _LOGS):
        return None
    return training_curves(folder)


def save_training_curves(folder: str | Path) -> list[Path]:
    return style.save(training_curves(folder), "training_loss", folder)


if __name__ == "__main__":
    for path in save_training_curves(sys.argv[1]):
        print(path)
