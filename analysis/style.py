"""One place for the look of every figure, and the only writer of figure files."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["apply", "save", "PALETTE", "BITS_COLORS", "bits_color", "REL_L2_LABEL"]

PALETTE = sns.color_palette("colorblind")

# One colour per activation bit width, the same in every figure (Figure 3, the theory figures, ...).
BITS_COLORS: dict[int, tuple[float, float, float]] = {8: PALETTE[0], 6: PALETTE[2], 4: PALETTE[1], 3: PALETTE[3],
                                                      2: PALETTE[4], 32: PALETTE[7]}

# Distances in the figures are ratios of norms: the unit is stated once, here.
REL_L2_LABEL = "relative L2 distance ||x - ref|| / ||ref||"


def bits_color(bits: int) -> tuple[float, float, float]:
    """The colour of a bit width (`BITS_COLORS`); a width without one raises, naming those that have one."""
    if int(bits) not in BITS_COLORS:
        raise ValueError(f"no colour for {bits} bits; bit widths with a colour: {sorted(BITS_COLORS)}")
    return BITS_COLORS[int(bits)]


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
