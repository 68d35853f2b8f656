"""KID over all samples, and its value on every bootstrap resample of the generated set.

torch-fidelity's KID averages the unbiased MMD^2 (polynomial kernel k(x, y) = (x.y / d + 1)^3) over 100
random subsets of 1000 samples a side; the spread it reports (kid_std) is that of the subsets, not an
interval of the estimate. Here KID is the same unbiased MMD^2 over every sample at once (Gretton et al.
2012, eq. 3):

    KID = sum_{i != j} k(x_i, x_j) / (n (n - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
          - 2 sum_{i,j} k(x_i, y_j) / (n m)

which is torch-fidelity's with one subset holding all samples when n = m (tested). A resample b, drawn
with replacement, enters only through the counts w_b (how often each generated sample was drawn): the
generated-generated sum of the resampled set is w_b' K w_b - sum_i w_bi K_ii (a pair of positions holding
the same sample counts, as the estimator applied to the resampled set does), the cross sum is w_b' K_xy 1.
So all resamples cost one pass over the n x n kernel, in float64 (the three sums are O(1) each and KID is
their O(1e-3) difference), on the features' device; the reference's own sum is computed once per reference.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["polynomial_kernel", "reference_kernel_sum", "kid_resamples", "kid_all_samples"]

_CHUNK_ROWS = 2048


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's KID kernel (degree 3, gamma 1/d, coef0 1), in the inputs' dtype."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _as_float64(features: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    out = torch.as_tensor(features, dtype=torch.float64)
    if out.ndim != 2 or len(out) < 2:
        raise ValueError(f"{name} must be (N, d) with N >= 2, got shape {tuple(out.shape)}")
    return out


def reference_kernel_sum(ref_features: np.ndarray | torch.Tensor) -> float:
    """sum_{i != j} k(y_i, y_j) over the reference: the term every KID against it shares (computed once)."""
    y = _as_float64(ref_features, "ref_features")
    total = 0.0
    for start in range(0, len(y), _CHUNK_ROWS):
        block = polynomial_kernel(y[start:start + _CHUNK_ROWS], y)
        total += float(block.sum()) - float(block.diagonal(offset=start).sum())
    return total


def kid_resamples(features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor, indices: np.ndarray,
                  ref_kernel_sum: Optional[float] = None) -> np.ndarray:
    """(B,) KID of each resample ``features[indices[b]]`` against the fixed reference features
    (``ref_kernel_sum``: `reference_kernel_sum` of them, computed here when not given)."""
    x, y = _as_float64(features, "features"), _as_float64(ref_features, "ref_features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of dimension {x.shape[1]} and reference features of dimension {y.shape[1]}")
    n, m = len(x), len(y)
    if indices.ndim != 2 or indices.shape[1] != n:
        raise ValueError(f"indices must be (B, {n}), got {indices.shape}")
    counts = torch.from_numpy(np.stack([np.bincount(row, minlength=n) for row in indices])).to(x)
    quadratic = torch.zeros(len(counts), dtype=torch.float64, device=x.device)
    cross_rows = torch.zeros(n, dtype=torch.float64, device=x.device)
    diagonal = torch.zeros(n, dtype=torch.float64, device=x.device)
    every_pair = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        block = polynomial_kernel(x[rows], x)  # (c, n)
        quadratic += ((counts @ block.T) * counts[:, rows]).sum(dim=1)
        every_pair += block.sum()
        diagonal[rows] = block.diagonal(offset=start)
        cross_rows[rows] = polynomial_kernel(x[rows], y).sum(dim=1)
    # A row holding every sample once (the estimate itself) takes plain sums, whose order does not depend on
    # how many rows come with it: the matrix products' does, by a few ulps that KID's cancellation magnifies.
    each_once = (counts == 1).all(dim=1)
    quadratic = torch.where(each_once, every_pair, quadratic)
    within_generated = (quadratic - torch.where(each_once, diagonal.sum(), counts @ diagonal)) / (n * (n - 1))
    cross = torch.where(each_once, cross_rows.sum(), counts @ cross_rows) / (n * m)
    within_reference = reference_kernel_sum(y) if ref_kernel_sum is None else ref_kernel_sum
    return (within_generated + within_reference / (m * (m - 1)) - 2 * cross).cpu().numpy()


def kid_all_samples(features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor,
                    ref_kernel_sum: Optional[float] = None) -> float:
    """KID (unbiased MMD^2, polynomial kernel) over every generated and reference sample."""
    n = len(features)
    return float(kid_resamples(features, ref_features, np.arange(n)[None], ref_kernel_sum)[0])
