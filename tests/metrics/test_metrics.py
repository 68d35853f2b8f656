"""Metrics through torch-fidelity with the Fashion-MNIST classifier as feature extractor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from modiff.metrics.classifier import FMNISTClassifier, accuracy, load_classifier
from modiff.metrics.compare import fidelity_to_reference, mean_ci, psnr
from modiff.metrics.fidelity import (
    EXTRACTOR, _features, _register, compute_metrics, frechet_distance, load_images, save_reference_stats,
)
from modiff.models.registry import data_dir

SHIPPED = data_dir() / "fmnist-classifier"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weight classifier (its features are as good as any for testing the plumbing)."""
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    model = FMNISTClassifier().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return str(folder / "model.safetensors")


def _images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Blurry blobs: varied enough to give full-rank feature covariances."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 8, 8))
    up = np.kron(base, np.ones((4, 4)))[:, :size, :size]
    return np.clip(127 + 60 * up, 0, 255).astype(np.uint8)[..., None]


def test_fid_of_a_set_against_itself_is_zero(weights: str) -> None:
    images = _images(300, 0)
    result = compute_metrics(images, images, ["fid"], weights=weights)
    assert abs(result["fid"]) < 1e-3
    assert result["feature_space"].startswith("Fashion-MNIST-classifier") and result["num_samples"] == 300


def test_fid_equals_direct_frechet_distance(weights: str) -> None:
    """torch-fidelity's FID equals scipy's Fréchet distance on the same classifier features."""
    a, b = _images(400, 1), _images(300, 2)
    _register()
    f_a = _features(a, EXTRACTOR, "penultimate", 100, torch.device("cpu"), weights).double().numpy()
    f_b = _features(b, EXTRACTOR, "penultimate", 100, torch.device("cpu"), weights).double().numpy()
    direct = frechet_distance(f_a.mean(0), np.cov(f_a, rowvar=False), f_b.mean(0), np.cov(f_b, rowvar=False))
    assert compute_metrics(a, b, ["fid"], weights=weights)["fid"] == pytest.approx(direct, rel=1e-4)


def test_frechet_distance_by_hand() -> None:
    """1-D case: (m1 - m2)^2 + (s1 - s2)^2."""
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(4 + 1)


def test_scores_do_not_depend_on_batch_size(weights: str) -> None:
    a, b = _images(200, 3), _images(200, 4)
    small = compute_metrics(a, b, ["fid", "isc", "prc"], batch_size=7, weights=weights)
    large = compute_metrics(a, b, ["fid", "isc", "prc"], batch_size=200, weights=weights)
    for key in ("fid", "is_mean", "precision", "recall"):
        assert small[key] == pytest.approx(large[key], rel=1e-4, abs=1e-6), key


def test_folder_and_npz_inputs(tmp_path: Path) -> None:
    images = _images(12, 5)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i:03d}.png")
    np.savez(tmp_path / "x.npz", arr_0=images)
    assert np.array_equal(load_images(tmp_path), images)
    assert np.array_equal(load_images(tmp_path / "x.npz"), images)


def test_bad_inputs(tmp_path: Path, weights: str) -> None:
    """Mixed folders, too few, NaN and identical images, and a wrong-extractor statistics file."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("L", (32, 32)).save(mixed / "a.png")
    Image.new("RGB", (28, 28)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="mixes image sizes or modes"):
        load_images(mixed)
    with pytest.raises(ValueError, match="at least 10"):
        compute_metrics(_images(5, 0), _images(50, 1), ["fid"], weights=weights)
    with pytest.raises(ValueError, match="NaN"):
        load_images(np.full((20, 32, 32, 1), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="identical"):
        compute_metrics(np.full((20, 32, 32, 1), 7, dtype=np.uint8), _images(50, 1), ["fid"], weights=weights)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(128), sigma=np.eye(128), extractor="inception-v3-compat", layer="2048")
    with pytest.raises(ValueError, match="inception-v3-compat"):
        compute_metrics(_images(20, 0), stats, ["fid"], weights=weights)
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(_images(20, 0), _images(20, 1), ["fidd"], weights=weights)


def test_reference_stats_file_gives_the_same_fid(tmp_path: Path, weights: str) -> None:
    """FID against a saved statistics file equals FID against the images it was made from."""
    a, b = _images(200, 6), _images(250, 7)
    path = save_reference_stats(b, tmp_path / "ref.npz", weights=weights)
    with np.load(path) as stats:
        assert str(stats["extractor"]) == EXTRACTOR and int(stats["num_images"]) == 250
    assert compute_metrics(a, path, ["fid"], weights=weights)["fid"] == pytest.approx(
        compute_metrics(a, b, ["fid"], weights=weights)["fid"], rel=1e-4)
    with pytest.raises(ValueError, match="FID only"):
        compute_metrics(a, path, ["fid", "kid"], weights=weights)


def test_fidelity_to_reference_and_ci() -> None:
    ref = _images(30, 8)
    noisy = np.clip(ref.astype(int) + np.random.default_rng(0).integers(-3, 4, ref.shape), 0, 255).astype(np.uint8)
    out = fidelity_to_reference(noisy, ref, features=False)
    assert 35 < out["psnr_db"]["mean"] < 45 and out["rel_l2_pixels"]["mean"] < 0.05
    assert psnr(ref[:1], ref[:1])[0] == np.inf
    assert fidelity_to_reference(ref, ref, features=False)["identical_samples"] == 30
    ci = mean_ci(np.array([1.0, 2.0, 3.0]))
    assert ci["mean"] == 2.0 and ci["ci95"] == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    with pytest.raises(ValueError, match="same seeds"):
        fidelity_to_reference(ref[:3], ref[:4], features=False)


@pytest.mark.skipif(not (SHIPPED / "manifest.json").exists(), reason="no shipped classifier in data/fmnist-classifier")
def test_shipped_classifier_accuracy() -> None:
    """The shipped classifier reaches its recorded test accuracy (>= 93%) on the real test set."""
    from modiff.datasets import fashion_mnist

    recorded = json.loads((SHIPPED / "manifest.json").read_text())["test_accuracy"]
    assert recorded >= 0.93
    try:
        images, labels = fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    assert accuracy(load_classifier(), images, labels) == pytest.approx(recorded, abs=1e-4)


def test_inception_without_weights_names_the_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline and without the Inception weights, the error names the file and where to put it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        compute_metrics(_images(20, 0), _images(20, 1), ["fid"], extractor="inception-v3-compat")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_metrics(_images(20, 0), _images(20, 1), ["fid"], extractor="inception-v3-compat",
                        weights=str(tmp_path / "missing.pth"))


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped classifier")
def test_evaluate_writes_metrics_json(tmp_path: Path, tame_denoiser) -> None:
    """`evaluate` samples (resumably), scores against the shipped statistics, and compares with fp per seed."""
    from modiff.pipelines.evaluate import evaluate
    from modiff.pipelines.generate import SampleConfig

    config = SampleConfig(steps=2)
    fp = evaluate(tame_denoiser, range(10), tmp_path / "fp", config, metrics=("fid", "isc"), device="cpu")
    assert fp["metrics"]["num_samples"] == 10 and np.isfinite(fp["metrics"]["fid"])
    result = evaluate(tame_denoiser, range(10), tmp_path / "q", config, quant_preset="w8a4-modiff",
                      metrics=("fid",), fp_run=tmp_path / "fp", device="cpu")
    saved = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert saved["seeds"] == "0-9" and saved["model"]["quant_preset"] == "w8a4-modiff"
    assert saved["feature_extractor"] == "fmnist-classifier" and saved["reference"] == "fmnist-train"
    assert 0 < result["fidelity_to_fp"]["rel_l2_pixels"]["mean"] < 1


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped classifier")
def test_fid_and_is_against_a_named_reference_need_only_its_statistics(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With only the committed FID statistics of fmnist-train (no dataset, no cached features), FID equals
    the Frechet distance to those statistics and IS is computed; KID, which needs the reference images,
    uses the shipped fmnist-test features instead and says so."""
    import shutil

    import modiff.datasets
    from modiff.metrics import fidelity

    stats_file = "fmnist-train-fmnist-classifier-stat-fid-penultimate.pt"
    test_features = "fmnist-test-fmnist-classifier-features-penultimate.pt"
    for name in (stats_file, test_features):
        shutil.copy(fidelity.shipped_cache() / name, tmp_path / name)
    monkeypatch.setattr(fidelity, "cache_root", lambda *args: tmp_path)

    def no_dataset(*args, **kwargs):
        raise FileNotFoundError("Fashion-MNIST (train) not found")

    monkeypatch.setattr(modiff.datasets, "_load_raw", no_dataset)
    monkeypatch.setattr(modiff.datasets, "has_raw", lambda *args, **kwargs: False)
    images = _images(64, 0)
    result = compute_metrics(images, "fmnist-train", ["fid", "isc"])
    stats = torch.load(tmp_path / stats_file, weights_only=False)
    features = fidelity.classifier_features(images).double().numpy()
    direct = frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False), stats["mu"], stats["sigma"])
    assert result["fid"] == pytest.approx(direct, rel=1e-4) and result["is_mean"] >= 1.0
    kid = compute_metrics(images, "fmnist-train", ["kid"])
    assert kid["kid_prc_reference"] == "fmnist-test"
    assert kid["kid_mean"] == compute_metrics(images, "fmnist-test", ["kid"])["kid_mean"]
    both = compute_metrics(images, "fmnist-train", ["fid", "kid"])  # FID keeps fmnist-train's statistics
    assert both["fid"] == result["fid"] and both["kid_mean"] == kid["kid_mean"]


def test_one_feature_pass_gives_torch_fidelitys_scores_and_the_fid_interval(weights: str) -> None:
    """`score` extracts the samples' features once; every score equals torch-fidelity's calculate_metrics,
    and FID comes with its bootstrap interval (fixed keys), resampled FIDs for paired comparisons."""
    import torch_fidelity

    from modiff.metrics.bootstrap import BootstrapConfig
    from modiff.metrics.fidelity import UInt8Images, _common_kwargs, score

    a, b = _images(120, 5), _images(150, 6)
    scored = score(a, b, ["fid", "isc", "kid", "prc"], weights=weights, bootstrap=BootstrapConfig(resamples=50, seed=3))
    raw = torch_fidelity.calculate_metrics(input1=UInt8Images(a), input2=UInt8Images(b), fid=True, isc=True, kid=True,
                                           prc=True, kid_subset_size=120, isc_splits=1,
                                           **_common_kwargs(EXTRACTOR, 250, torch.device("cpu"), weights))
    m = scored.metrics
    assert m["fid"] == raw["frechet_inception_distance"] and m["is_mean"] == raw["inception_score_mean"]
    assert m["is_std"] == raw["inception_score_std"] and m["is_splits"] == 1  # 120 images: one split
    assert m["kid_mean"] == raw["kernel_inception_distance_mean"]
    for key in ("precision", "recall", "f_score"):  # the share is counted in float64, torch-fidelity's in float32
        assert m[key] == pytest.approx(raw[key], abs=1e-6), key
    assert m["fid_ci95_low"] < m["fid"] < m["fid_ci95_high"]
    for key in ("kid", "precision", "recall", "f_score"):
        assert m[f"{key}_ci95_low"] < m[key] < m[f"{key}_ci95_high"], key
        assert scored.resamples[key].shape == (50,)
    assert m["is_ci95_low"] <= m["is_mean"] <= m["is_ci95_high"] and m["is_ci95_low"] < m["is_ci95_high"]
    assert m["fid_bootstrap_resamples"] == 50 and m["fid_bootstrap_seed"] == 3 and scored.fid_resamples.shape == (50,)
    again = compute_metrics(a, b, ["fid"], weights=weights, bootstrap=BootstrapConfig(resamples=50, seed=3))
    assert (again["fid_ci95_low"], again["fid_ci95_high"]) == (m["fid_ci95_low"], m["fid_ci95_high"])  # deterministic
    plain = compute_metrics(a, b, ["fid", "kid", "prc"], weights=weights, bootstrap=None)
    assert plain["fid"] == m["fid"] and plain["kid"] == m["kid"] and plain["recall"] == m["recall"]
    assert not [key for key in plain if "ci95" in key]
    assert "is_ci95_low" not in compute_metrics(a, b, ["isc"], weights=weights, bootstrap=None)


def test_inception_score_splits_hold_at_least_a_thousand_images() -> None:
    """10 splits (torch-fidelity's default) from 10,000 images on, fewer below, one below 2,000: IS over a
    small split is biased toward 1 (a single image's IS is exactly 1)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    from modiff.metrics.fidelity import is_splits

    assert [is_splits(n) for n in (10, 1999, 2000, 9999, 10_000, 50_000)] == [1, 1, 2, 9, 10, 10]
    one_image_each = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    assert isc_features_to_metric(one_image_each, splits=10)["inception_score_mean"] == pytest.approx(1.0)


def test_inception_score_resamples_use_torch_fidelitys_estimator() -> None:
    """The rows in their own order reproduce torch-fidelity's IS (same splits, shuffle and seed); a set whose
    class probabilities are all alike scores exactly 1 in every resample (no KL from the marginal)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    from modiff.metrics.bootstrap import BootstrapConfig, resample_indices
    from modiff.metrics.fidelity import inception_score_resamples

    logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    own_order = inception_score_resamples(logits, np.arange(40)[None, :])
    assert own_order[0] == isc_features_to_metric(logits)["inception_score_mean"]
    alike = inception_score_resamples(torch.ones(40, 10), resample_indices(40, BootstrapConfig(resamples=20)))
    np.testing.assert_allclose(alike, 1.0)


def test_the_classifier_refuses_colour_images(weights: str) -> None:
    """It reads one channel of RGB copies of a gray image: colour images are refused, not scored by red alone."""
    gray = _images(20, 0)
    rgb_copies = np.repeat(gray, 3, axis=-1)
    assert compute_metrics(rgb_copies, gray, ["fid"], weights=weights, bootstrap=None)["fid"] < 1e-3
    colour = rgb_copies.copy()
    colour[..., 1:] = 0
    with pytest.raises(ValueError, match="gray images"):
        compute_metrics(colour, gray, ["fid"], weights=weights, bootstrap=None)


def test_share_intervals_stay_within_0_and_1(weights: str) -> None:
    """Precision, recall and f_score are shares: at a dozen samples the recentred interval would pass 1
    (recall 0.87 [0.50, 1.01] in a quick Table 1 row), so it is cut at 0 and 1."""
    from modiff.metrics.bootstrap import BootstrapConfig

    m = compute_metrics(_images(12, 1), _images(12, 1), ["prc"], weights=weights,
                        bootstrap=BootstrapConfig(resamples=100))
    for key in ("precision", "recall", "f_score"):
        assert 0.0 <= m[f"{key}_ci95_low"] <= m[key] <= m[f"{key}_ci95_high"] <= 1.0, key
    assert m["precision"] == m["recall"] == 1.0 and m["recall_ci95_high"] == 1.0  # a set against itself
