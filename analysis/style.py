"""One place for the look of every figure, and the only writer of figure files."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["apply", "save", "PALETTE"]

PALETTE = sns.color_palette("colorblind")


def apply() -> None:
    """Readable defaults for papers and notebooks."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 160, "savefig.bbox": "tight", "axes.titlesize": "medium"})


def save(fig: plt.Figure, name: str, out_dir: str | Path) -> list[Path]:
    """Write `fig` as PNG and PDF under out_dir/figures/; returns the paths."""
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path)
    return paths
