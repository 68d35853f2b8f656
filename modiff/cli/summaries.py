"""What the `modiff` commands print besides their JSON: short summaries in words and numbers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["samples_on_disk", "fidelity_lines"]


def samples_on_disk(out: Path, seeds: Sequence[int]) -> int:
    """How many of the seeds' PNGs a run folder holds already (a re-run reuses them)."""
    from modiff.pipelines.run_folder import seeds_on_disk

    return len(seeds_on_disk(out / "samples", seeds))


def _mean_ci(value: Optional[Mapping[str, Any]], digits: int, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value['mean']:.{digits}f} ± {value['ci95']:.{digits}f}{unit}"


def fidelity_lines(fidelity: Mapping[str, Any]) -> list[str]:
    """The per-seed comparison with the fp run (`modiff.metrics.compare.fidelity_to_reference`), one line a
    distance: mean ± the half-width of its 95% confidence interval."""
    pixels = fidelity["rel_l2_pixels"]
    identical = fidelity.get("identical_samples", 0)
    psnr = _mean_ci(fidelity.get("psnr_db"), 2, " dB")
    if identical:
        psnr += f" ({identical} seeds identical to fp, left out)"
    rows = [("PSNR", psnr), ("relative L2 (pixels)", _mean_ci(pixels, 4))]
    if "rel_l2_features" in fidelity:
        rows.append(("relative L2 (classifier features)", _mean_ci(fidelity["rel_l2_features"], 4)))
    header = f"fidelity to the fp run {fidelity['fp_run']}, per seed over {pixels['n']} seeds (mean ± 95% CI):"
    return [header, *(f"  {label:<34}{value}" for label, value in rows)]
