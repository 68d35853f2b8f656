"""Precision and recall (Kynkäänniemi et al. 2019) on every bootstrap resample of the generated set.

torch-fidelity's estimator (`torch_fidelity.metric_prc`): each sample's ball has the radius of its
k-th nearest neighbour in its own set (k = 3; the k+1-th smallest distance, itself included); precision
is the share of generated samples inside some reference ball, recall the share of reference samples
inside some generated ball. Here the estimator is applied unchanged to each resample drawn with
replacement, as FID's and IS's intervals are (`modiff.metrics.bootstrap`):

- precision: the reference balls do not depend on the resample, so each generated sample's "inside"
  is fixed and a resample's precision is their mean over its draws;
- recall: a resample's balls are those of its own points. A sample drawn w times is w points at distance
  0 from each other, so its radius is the k+1-th smallest distance counted with multiplicity over its
  nearest neighbours present in the resample. The radii come from each sample's `_NEIGHBOURS` nearest
  neighbours (a row whose draws do not reach k+1 within them is recomputed over the whole set), and a
  reference sample can lie only in balls of generated samples within the largest radius any resample
  gives them, so the coverage test runs over those candidate pairs only.

Distances are torch.cdist's in float32, as torch-fidelity's; the resamples equal torch-fidelity's
estimator on the resampled set (tested). The reference's radii, which every set scored against it shares,
are computed once per reference.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["NEIGHBOURHOOD", "reference_radii", "precision_recall_resamples", "precision_recall"]

NEIGHBOURHOOD = 3  # torch-fidelity's prc_neighborhood
_NEIGHBOURS = 32
_CHUNK_ROWS = 2048


def _as_float32(features: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    out = torch.as_tensor(features, dtype=torch.float32)
    if out.ndim != 2 or len(out) <= NEIGHBOURHOOD:
        raise ValueError(f"{name} must be (N, d) with N > {NEIGHBOURHOOD}, got shape {tuple(out.shape)}")
    return out


def reference_radii(ref_features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """torch-fidelity's radii: the k+1-th smallest distance from each sample to its own set (the reference's
    are shared by every set scored against it: computed once)."""
    x = _as_float32(ref_features, "ref_features")
    return torch.cat([torch.cdist(x[s:s + _CHUNK_ROWS], x).kthvalue(NEIGHBOURHOOD + 1, dim=1).values
                      for s in range(0, len(x), _CHUNK_ROWS)])


def _inside_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(len(points),) bool: each point lies in some ball (centre, radius)."""
    return torch.cat([(torch.cdist(points[s:s + _CHUNK_ROWS], centres) <= radii).any(dim=1)
                      for s in range(0, len(points), _CHUNK_ROWS)])


def _nearest(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's ``count`` nearest samples of its own set (itself included), closest first."""
    found = [torch.cdist(x[s:s + _CHUNK_ROWS], x).topk(count, dim=1, largest=False)
             for s in range(0, len(x), _CHUNK_ROWS)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def _resample_radii(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, n) the radius of each sample within each resample (counts (B, n)); -1 (no ball) where it was not drawn."""
    n = len(x)
    distances, neighbours = _nearest(x, min(_NEIGHBOURS, n))
    radii = torch.full(counts.shape, -1.0, device=x.device)
    for b, row in enumerate(counts):
        drawn = row[neighbours]  # (n, L) draws of each neighbour
        reached = drawn.cumsum(dim=1) >= NEIGHBOURHOOD + 1
        radius = distances.gather(1, reached.to(torch.uint8).argmax(dim=1, keepdim=True)).squeeze(1)
        short = ~reached[:, -1]
        for i in torch.nonzero(short & (row > 0)).flatten().tolist():  # rare: too few draws among the nearest
            full = torch.cdist(x[i:i + 1], x)[0]
            order = full.argsort()
            radius[i] = full[order][int(torch.nonzero(row[order].cumsum(0) >= NEIGHBOURHOOD + 1)[0])]
        radii[b] = torch.where(row > 0, radius, -1.0)
    return radii


def _resample_recall(x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
    radii = _resample_radii(x, counts)
    largest = radii.amax(dim=0)  # (n,) the largest ball any resample gives each sample
    pairs_ref, pairs_gen, pairs_distance = [], [], []
    for s in range(0, len(y), _CHUNK_ROWS):
        d = torch.cdist(y[s:s + _CHUNK_ROWS], x)
        ref, gen = torch.nonzero(d <= largest, as_tuple=True)
        pairs_ref.append(ref + s), pairs_gen.append(gen), pairs_distance.append(d[ref, gen])
    ref, gen, distance = torch.cat(pairs_ref), torch.cat(pairs_gen), torch.cat(pairs_distance)
    recall = np.empty(len(counts))
    for b in range(len(counts)):
        inside = distance <= radii[b, gen]
        covered = torch.zeros(len(y), dtype=torch.bool, device=y.device).index_fill_(0, ref[inside], True)
        recall[b] = covered.double().mean().item()
    return recall


def precision_recall_resamples(features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor,
                               indices: np.ndarray, ref_radii: Optional[torch.Tensor] = None
                               ) -> tuple[np.ndarray, np.ndarray]:
    """((B,), (B,)) precision and recall of each resample ``features[indices[b]]`` against the reference
    (``ref_radii``: `reference_radii` of it, computed here when not given); on the features' device."""
    x, y = _as_float32(features, "features"), _as_float32(ref_features, "ref_features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features of dimension {x.shape[1]} and reference features of dimension {y.shape[1]}")
    if indices.ndim != 2 or indices.shape[1] != len(x):
        raise ValueError(f"indices must be (B, {len(x)}), got {indices.shape}")
    radii = reference_radii(y) if ref_radii is None else ref_radii.to(y)
    inside_reference = _inside_any(x, y, radii).double().cpu().numpy()
    precision = inside_reference[indices].mean(axis=1)
    counts = torch.from_numpy(np.stack([np.bincount(row, minlength=len(x)) for row in indices])).to(x.device)
    return precision, _resample_recall(x, y, counts)


def precision_recall(features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor,
                     ref_radii: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """torch-fidelity's precision and recall of the generated set against the reference."""
    precision, recall = precision_recall_resamples(features, ref_features, np.arange(len(features))[None], ref_radii)
    return float(precision[0]), float(recall[0])
