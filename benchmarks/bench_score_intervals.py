"""The bootstrap intervals of KID and precision/recall against one torch-fidelity evaluation, side by side in
one process.

    python benchmarks/bench_score_intervals.py --out benchmarks/results/score_intervals_cpu.json

Real classifier features: the generated set is the images of a summary (default: the committed fmnist-ddim
paper fp anchor, 10,000 samples), the reference the shipped fmnist-test features (10,000), as a paper row is
scored. Timed: the
reference's own terms (once per process), the 300 resamples of KID and of precision/recall with the
estimate, and torch-fidelity's one KID (100 subsets of 1,000) and one precision/recall.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from modiff.metrics.bootstrap import BootstrapConfig, resample_indices
from modiff.metrics.fidelity import classifier_features, load_images, shipped_cache
from modiff.metrics.kid import kid_resamples, reference_kernel_sum
from modiff.metrics.precision_recall import precision_recall_resamples, reference_radii
from modiff.utils.runs import environment


def _seconds(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return round(time.perf_counter() - started, 2), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="an .npz of uint8 images",
                        default=Path("data/summaries/paper/spacing-quad/fp-ddim100-tf32/images.npz"))
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = parser.parse_args()
    reference = torch.load(shipped_cache() / "fmnist-test-fmnist-classifier-features-penultimate.pt")
    features = classifier_features(load_images(args.images))
    indices = np.concatenate([np.arange(len(features))[None],
                              resample_indices(len(features), BootstrapConfig(resamples=args.resamples))])
    row = {"samples": len(features), "reference": len(reference), "resamples": args.resamples}
    row["reference_terms_s"], (kernel_sum, radii) = _seconds(
        lambda: (reference_kernel_sum(reference), reference_radii(reference)))
    row["kid_resamples_s"], _ = _seconds(lambda: kid_resamples(features, reference, indices, kernel_sum))
    row["precision_recall_resamples_s"], _ = _seconds(
        lambda: precision_recall_resamples(features, reference, indices, radii))
    kid_kwargs = dict(kid_subsets=100, kid_subset_size=min(1000, len(features)), kid_kernel="poly",
                      kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=2020,
                      verbose=False)
    row["torch_fidelity_kid_once_s"], _ = _seconds(lambda: kid_features_to_metric(features, reference, **kid_kwargs))
    row["torch_fidelity_prc_once_s"], _ = _seconds(
        lambda: calculate_precision_recall_part(features, reference, 3, 10_000))
    print(json.dumps(row, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(), "rows": [row]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
