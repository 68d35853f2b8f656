"""Bootstrap FID intervals and paired verdicts (modiff.metrics.bootstrap), on features with known statistics."""
from __future__ import annotations

import numpy as np
import pytest

from modiff.metrics.bootstrap import (BootstrapConfig, fid_resamples, paired_difference, recentred_interval,
                                      resample_indices)


def _fid_point(x: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """torch-fidelity's formula on the full set (the estimate the interval is built around)."""
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(torch.as_tensor(x))
    return fid_statistics_to_metric(stats, {"mu": mu_ref, "sigma": sigma_ref}, False)["frechet_inception_distance"]


def test_identity_resample_equals_torch_fidelity_fid() -> None:
    """The batched eigenvalue form equals torch-fidelity's FID when the resample is the set itself."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    ref = rng.normal(size=(500, 6)) * 2 + 1
    mu_ref, sigma_ref = ref.mean(0), np.cov(ref, rowvar=False)
    ours = fid_resamples(x, mu_ref, sigma_ref, np.arange(200)[None])[0]
    assert ours == pytest.approx(_fid_point(x, mu_ref, sigma_ref), rel=1e-9)


def test_identical_sets_give_zero_fid_and_an_interval_around_it() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    fid = _fid_point(x, mu, sigma)
    resampled = fid_resamples(x, mu, sigma, resample_indices(len(x)))
    low, high = recentred_interval(fid, resampled)
    assert abs(fid) < 1e-8 and (resampled > 0).all()  # a resample repeats samples: its FID is above the set's
    assert low <= fid <= high and high - low > 0
    plain_low = np.quantile(resampled, 0.025)
    assert plain_low > fid  # the plain percentile interval would miss the estimate: why it is recentred


def test_gaussian_interval_width_matches_the_spread_over_independent_draws() -> None:
    """Generated N(mu, I) against the exact reference N(0, I) in 2-d: FID = |mu|^2 + (sampling terms); the
    bootstrap half-width must match 1.96 x the standard deviation of FID over 300 independent sets."""
    rng = np.random.default_rng(3)
    mu, n = np.array([3.0, 0.0]), 2000
    mu_ref, sigma_ref = np.zeros(2), np.eye(2)
    draws = [_fid_point(rng.normal(size=(n, 2)) + mu, mu_ref, sigma_ref) for _ in range(300)]
    x = rng.normal(size=(n, 2)) + mu
    fid = _fid_point(x, mu_ref, sigma_ref)
    low, high = recentred_interval(fid, fid_resamples(x, mu_ref, sigma_ref, resample_indices(n, BootstrapConfig(500))))
    assert np.mean(draws) == pytest.approx(9.0, abs=0.05)
    assert (high - low) / 2 == pytest.approx(1.96 * np.std(draws), rel=0.25)
    assert low < fid < high


def test_resampling_is_deterministic_given_the_seed() -> None:
    a = resample_indices(50, BootstrapConfig(resamples=20, seed=7))
    assert np.array_equal(a, resample_indices(50, BootstrapConfig(resamples=20, seed=7)))
    assert not np.array_equal(a, resample_indices(50, BootstrapConfig(resamples=20, seed=8)))
    assert a.shape == (20, 50) and a.min() >= 0 and a.max() < 50


def test_paired_verdicts_on_constructed_cases() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(size=(400, 3))
    mu_ref, sigma_ref = np.zeros(3), np.eye(3)
    idx = resample_indices(400)
    shifted = base + np.array([1.0, 0.0, 0.0])  # the same samples moved away from the reference: clearly worse
    fid_base, fid_shifted = _fid_point(base, mu_ref, sigma_ref), _fid_point(shifted, mu_ref, sigma_ref)
    r_base, r_shifted = (fid_resamples(v, mu_ref, sigma_ref, idx) for v in (base, shifted))
    worse = paired_difference(fid_shifted, fid_base, r_shifted, r_base)
    assert worse["verdict"] == "worse" and worse["low"] > 0 and worse["difference"] == pytest.approx(1.0, abs=0.2)
    assert paired_difference(fid_base, fid_shifted, r_base, r_shifted)["verdict"] == "better"
    same = paired_difference(fid_base, fid_base, r_base, r_base)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "verdict": "no difference"}
    other = base + rng.normal(scale=1e-3, size=base.shape)  # a tiny perturbation: within the interval
    r_other = fid_resamples(other, mu_ref, sigma_ref, idx)
    assert paired_difference(_fid_point(other, mu_ref, sigma_ref), fid_base, r_other, r_base)["verdict"] == "no difference"
    # a score where higher is better (precision, recall): the same interval above 0 is now "better"
    flipped = paired_difference(fid_shifted, fid_base, r_shifted, r_base, higher_is_better=True)
    assert flipped["verdict"] == "better" and (flipped["low"], flipped["high"]) == (worse["low"], worse["high"])
    assert paired_difference(fid_base, fid_shifted, r_base, r_shifted, higher_is_better=True)["verdict"] == "worse"


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="resamples must be >= 10"):
        BootstrapConfig(resamples=5)
    with pytest.raises(ValueError, match="level"):
        BootstrapConfig(level=1.5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        resample_indices(1)
    with pytest.raises(ValueError, match="indices"):
        fid_resamples(np.zeros((5, 2)), np.zeros(2), np.eye(2), np.zeros((3, 4), dtype=int))
    with pytest.raises(ValueError, match="do not match"):
        fid_resamples(np.zeros((5, 2)), np.zeros(3), np.eye(3), np.zeros((3, 5), dtype=int))
    with pytest.raises(ValueError, match="same indices"):
        paired_difference(1.0, 2.0, np.zeros(10), np.zeros(11))
