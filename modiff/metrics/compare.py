"""Fidelity to full precision: per-sample distances between quantized and fp samples of the same seeds.

Meaningful at sample counts far below what FID needs: for each seed, PSNR and relative L2
(||x_q - x_fp|| / ||x_fp||) in pixel space ([0, 1] scale) and relative L2 in classifier-feature space,
averaged with a 95% confidence interval (Student t).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

__all__ = ["mean_ci", "psnr", "relative_l2", "averaged_distances", "fidelity_to_reference"]


def mean_ci(values: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean and the half-width of its confidence interval (Student t; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("mean_ci needs finite values")
    half = 0.0
    if values.size > 1:
        half = float(stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return {"mean": float(values.mean()), "ci95": half, "n": int(values.size)}


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64)


def psnr(estimate: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Per-sample PSNR in dB; identical images give +inf (reported as such, not averaged in)."""
    mse = ((_flat(estimate) - _flat(reference)) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak**2 / mse)


def relative_l2(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample ||estimate - reference|| / ||reference||."""
    diff = np.linalg.norm(_flat(estimate) - _flat(reference), axis=1)
    norm = np.linalg.norm(_flat(reference), axis=1)
    if np.any(norm == 0):
        raise ValueError("a reference sample is all zeros: its relative L2 distance is undefined")
    return diff / norm


def averaged_distances(psnr_db: np.ndarray, rel_l2_pixels: np.ndarray) -> dict[str, Any]:
    """Per-seed PSNR and relative L2 averaged with 95% CIs (identical samples, PSNR +inf, counted apart)."""
    psnr_db = np.asarray(psnr_db, dtype=np.float64)
    finite = psnr_db[np.isfinite(psnr_db)]
    return {"identical_samples": int((~np.isfinite(psnr_db)).sum()),
            "psnr_db": mean_ci(finite) if finite.size else None, "rel_l2_pixels": mean_ci(rel_l2_pixels)}


def fidelity_to_reference(estimate: np.ndarray, reference: np.ndarray, features: bool = True) -> dict[str, Any]:
    """Per-seed distances of uint8 image sets (same seeds, same order), averaged with 95% CIs."""
    if estimate.shape != reference.shape:
        raise ValueError(f"image sets differ in shape: {estimate.shape} vs {reference.shape}; use the same seeds")
    out = averaged_distances(psnr(estimate, reference), relative_l2(estimate, reference))
    if features:
        from modiff.metrics.fidelity import classifier_features

        f_est = classifier_features(estimate).double().numpy()
        f_ref = classifier_features(reference).double().numpy()
        out["rel_l2_features"] = mean_ci(relative_l2(f_est, f_ref))
    return out
