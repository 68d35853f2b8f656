"""Two samplings of the same run compared image by image: what another GPU, commit or session changed.

TF32 sampling is not bit-reproducible across GPUs or processes, and a 3-4 bit network can turn one rounding
difference into another image. Two samplings can agree on FID within its interval while their images moved;
this measures how far, on the seeds whose images both folders hold (a run holds every seed, a summary its
first 128, a full-precision summary all). Runs and summaries (`modiff.pipelines.summary`) are read alike.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modiff.metrics.compare import mean_ci, relative_l2
from modiff.pipelines.evaluate import seed_images
from modiff.pipelines.run_folder import identity_differences

__all__ = ["GREY_LEVELS", "ImageAgreement", "image_agreement", "agreement_rows"]

GREY_LEVELS = 4  # a difference a reader sees: more than this many of the 255 grey levels
COMPARED_PARTS = ("model", "sample")  # what makes two samplings the same run; execution (device, batch) may differ


@dataclass(frozen=True)
class ImageAgreement:
    """Over the seeds both samplings hold: the fraction of seeds with identical uint8 images, of pixels that
    differ, the seeds whose images differ somewhere by more than `GREY_LEVELS`, and the relative L2 of the
    second's images to the first's (mean with the half-width of its 95% Student-t interval over seeds, as Table 1's
    distances, and largest) over the seeds whose first image is not all black (a collapsed low-bit row can draw
    black images, to which no relative distance is defined; counted apart)."""

    seeds: int
    identical_images: float
    differing_pixels: float
    seeds_over_grey_levels: int
    rel_l2_mean: float
    rel_l2_ci95_halfwidth: float
    rel_l2_max: float
    black_first_images: int


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{folder} is neither a run nor a summary (no manifest.json)")
    return json.loads(path.read_text())


def _held_seeds(folder: Path) -> np.ndarray:
    images = folder / ("samples.npz" if (folder / "samples.npz").is_file() else "images.npz")
    if not images.is_file():
        raise ValueError(f"{folder} holds no images (neither samples.npz nor images.npz)")
    with np.load(images) as data:
        return np.asarray(data["seeds"], dtype=np.int64)


def image_agreement(first: str | Path, second: str | Path) -> ImageAgreement:
    """How far ``second``'s images lie from ``first``'s, seed by seed. Both must be samplings of the same
    model, preset and sampler settings (the execution may differ: that is what is compared)."""
    first, second = Path(first), Path(second)
    differences = identity_differences(_manifest(first)["identity"], _manifest(second)["identity"], COMPARED_PARTS)
    if differences:
        raise ValueError(f"{first} and {second} are not samplings of the same run: {'; '.join(differences)}")
    seeds = np.intersect1d(_held_seeds(first), _held_seeds(second))
    if seeds.size == 0:
        raise ValueError(f"{first} and {second} hold the images of no common seed")
    a = seed_images(first, seeds).astype(np.int16)
    b = seed_images(second, seeds).astype(np.int16)
    pixels = np.abs(b - a).reshape(len(seeds), -1)
    black = a.reshape(len(seeds), -1).max(axis=1) == 0
    seen = ~black
    rel = relative_l2(b[seen].astype(np.float64), a[seen].astype(np.float64)) if seen.any() else None
    mean = mean_ci(rel) if rel is not None else {"mean": np.nan, "ci95": np.nan}
    largest = pixels.max(axis=1)
    return ImageAgreement(seeds=int(seeds.size), identical_images=float((largest == 0).mean()),
                          differing_pixels=float((pixels > 0).mean()),
                          seeds_over_grey_levels=int((largest > GREY_LEVELS).sum()), rel_l2_mean=mean["mean"],
                          rel_l2_ci95_halfwidth=mean["ci95"], rel_l2_max=float(rel.max()) if rel is not None else np.nan,
                          black_first_images=int(black.sum()))


def _samplings(root: Path) -> dict[str, Path]:
    """Every run or summary at or below ``root``, by its path under ``root`` ("." for ``root`` itself)."""
    found = [p.parent for p in root.rglob("manifest.json") if "identity" in _manifest(p.parent)]
    return {str(folder.relative_to(root)): folder for folder in sorted(found)}


def agreement_rows(first: str | Path, second: str | Path) -> list[dict[str, Any]]:
    """`image_agreement` of each run (or summary) below ``first`` with the one at the same path below
    ``second``, with each one's device; runs only one side holds are left out, and none in common is an error."""
    ones, others = _samplings(Path(first)), _samplings(Path(second))
    common = [name for name in ones if name in others]
    if not common:
        raise ValueError(f"no run or summary lies at the same path below {first} and {second}")
    rows = []
    for name in common:
        devices = [_manifest(side[name])["identity"].get("execution", {}).get("device", "?")
                   for side in (ones, others)]
        rows.append({"run": name, "first_device": devices[0], "second_device": devices[1],
                     **asdict(image_agreement(ones[name], others[name]))})
    return rows
