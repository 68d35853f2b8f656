"""KID over all samples and precision/recall, on the generated set and on every bootstrap resample: equal to
torch-fidelity's estimators applied to the resampled set, and the bootstrap's spread near the spread over
independent draws."""
import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from modiff.metrics import precision_recall as prc
from modiff.metrics.kid import kid_all_samples, kid_resamples, reference_kernel_sum
from modiff.metrics.precision_recall import precision_recall, precision_recall_resamples, reference_radii


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) * scale + shift).astype(np.float32)


def _torch_fidelity_kid(x: np.ndarray, y: np.ndarray) -> float:
    kwargs = dict(kid_subsets=1, kid_subset_size=len(x), kid_kernel="poly", kid_kernel_poly_degree=3,
                  kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=0, verbose=False)
    return kid_features_to_metric(torch.from_numpy(x).double(), torch.from_numpy(y).double(),
                                  **kwargs)["kernel_inception_distance_mean"]


def test_kid_of_each_resample_is_torch_fidelitys_with_one_subset_of_every_sample() -> None:
    n = 150
    x, y = _gaussian(n, 8, 0), _gaussian(n, 8, 1, 1.2, 0.2)
    indices = np.vstack([np.arange(n), np.random.default_rng(2).integers(0, n, size=(4, n))])
    ours = kid_resamples(x, y, indices)
    for row, value in zip(indices, ours):
        assert value == pytest.approx(_torch_fidelity_kid(x[row], y), rel=1e-10, abs=1e-12)
    assert kid_all_samples(x, y) == ours[0]
    assert kid_all_samples(x, y, reference_kernel_sum(y)) == ours[0]


def test_kid_with_sets_of_unequal_size_is_the_unbiased_mmd_by_hand() -> None:
    x, y = _gaussian(5, 3, 3).astype(np.float64), _gaussian(7, 3, 4, 2.0).astype(np.float64)
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / (5 * 7)
    assert kid_all_samples(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def _torch_fidelity_prc(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return calculate_precision_recall_part(torch.from_numpy(x), torch.from_numpy(y), 3, 10_000)


def test_precision_and_recall_of_each_resample_are_torch_fidelitys_on_the_resampled_set() -> None:
    n = 300
    x, y = _gaussian(n, 16, 0), _gaussian(n, 16, 1, 1.1, 0.1)
    indices = np.vstack([np.arange(n), np.random.default_rng(1).integers(0, n, size=(5, n))])
    precision, recall = precision_recall_resamples(x, y, indices)
    for b, row in enumerate(indices):
        expected_precision, expected_recall = _torch_fidelity_prc(x[row], y)
        assert precision[b] == pytest.approx(expected_precision, abs=1e-6)
        assert recall[b] == pytest.approx(expected_recall, abs=1e-6)
    assert precision_recall(x, y) == (precision[0], recall[0])
    assert precision_recall(x, y, reference_radii(y)) == (precision[0], recall[0])


def test_a_drawn_sample_without_enough_drawn_neighbours_nearby_gets_its_exact_radius() -> None:
    """A resample that draws sample 0 once and otherwise only samples outside its 32 nearest: its radius
    is found over the whole set (the fallback), as torch-fidelity finds it."""
    n = 120
    x, y = _gaussian(n, 4, 5), _gaussian(n, 4, 6)
    nearest = set(np.argsort(np.linalg.norm(x - x[0], axis=1))[:prc._NEIGHBOURS].tolist())
    far = np.array([i for i in range(n) if i not in nearest])
    row = np.concatenate([[0], np.random.default_rng(7).choice(far, n - 1)])
    precision, recall = precision_recall_resamples(x, y, row[None])
    assert (precision[0], recall[0]) == pytest.approx(_torch_fidelity_prc(x[row], y), abs=1e-6)
    radii = prc._resample_radii(torch.from_numpy(x), torch.from_numpy(np.bincount(row, minlength=n))[None])
    exact = np.sort(np.linalg.norm(x[row] - x[0], axis=1))[3]
    assert radii[0, 0].item() == pytest.approx(exact, rel=1e-5)


def test_the_bootstrap_spread_is_near_the_spread_over_independent_draws() -> None:
    """Gaussian features, a fixed reference: the standard deviation of KID, precision and recall over 60
    independent generated sets of 1,000 against the mean bootstrap standard deviation of 4 such sets
    (measured 0.0029 / 0.0029, 0.0084 / 0.0101, 0.0130 / 0.0141: ratios 1.02, 1.21, 1.09)."""
    n, d = 1000, 16
    y = _gaussian(2000, d, 0)
    radii, kernel_sum = reference_radii(y), reference_kernel_sum(y)
    draws = []
    for seed in range(60):
        x = _gaussian(n, d, 100 + seed, 0.9, 0.05)
        draws.append((kid_all_samples(x, y, kernel_sum), *precision_recall(x, y, radii)))
    spread = np.std(draws, axis=0, ddof=1)
    boot = []
    for seed in range(4):
        x = _gaussian(n, d, 500 + seed, 0.9, 0.05)
        indices = np.random.default_rng(seed).integers(0, n, size=(200, n))
        boot.append([np.std(v, ddof=1) for v in (kid_resamples(x, y, indices, kernel_sum),
                                                   *precision_recall_resamples(x, y, indices, radii))])
    ratio = np.mean(boot, axis=0) / spread
    assert ((0.75 < ratio) & (ratio < 1.35)).all(), ratio


def test_bad_inputs_are_refused() -> None:
    x = _gaussian(10, 4, 0)
    with pytest.raises(ValueError, match="dimension"):
        kid_resamples(x, _gaussian(10, 5, 1), np.arange(10)[None])
    with pytest.raises(ValueError, match="indices must be"):
        kid_resamples(x, x, np.arange(9)[None])
    with pytest.raises(ValueError, match="N >= 2"):
        kid_all_samples(x[:1], x)
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(x, _gaussian(10, 5, 1))
    with pytest.raises(ValueError, match="indices must be"):
        precision_recall_resamples(x, x, np.arange(10))
    with pytest.raises(ValueError, match="N > 3"):
        precision_recall(x[:3], x)
