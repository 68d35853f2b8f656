"""Where the metrics cache features (issue 23): a user cache folder, never the checkout; KID and
precision/recall against fmnist-train without the Fashion-MNIST images; progress on stderr."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import modiff.datasets
from modiff.metrics import fidelity
from modiff.metrics.fidelity import compute_metrics

pytestmark = pytest.mark.skipif(not (fidelity.shipped_cache() / "fmnist-test-fmnist-classifier-features-penultimate.pt")
                                .is_file(), reason="no shipped fmnist-test features")


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    up = np.kron(rng.normal(size=(n, 8, 8)), np.ones((4, 4)))
    return np.clip(127 + 60 * up, 0, 255).astype(np.uint8)[..., None]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "modiff" / "fidelity"


def test_cache_is_the_users_and_the_shipped_files_stay_untouched(user_cache: Path) -> None:
    """torch-fidelity's cache is $XDG_CACHE_HOME/modiff/fidelity, seeded with the shipped files; scoring
    writes nothing into data/fidelity-cache."""
    shipped = _snapshot(fidelity.shipped_cache())
    assert fidelity.cache_root() == user_cache / fidelity.extractor_weights(fidelity.EXTRACTOR, None)[:16]
    assert {p.name for p in fidelity.shipped_cache().glob("*.pt")} <= {p.name for p in fidelity.cache_root().iterdir()}
    compute_metrics(_images(20, 0), "fmnist-test", ["fid", "kid"])
    assert _snapshot(fidelity.shipped_cache()) == shipped


def test_kid_and_prc_against_fmnist_train_are_against_fmnist_test_on_every_machine(
        user_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default metrics against fmnist-train: FID from its statistics, KID and precision/recall from the
    shipped fmnist-test features, named in the result, the same with the Fashion-MNIST images as without."""
    with_images = compute_metrics(_images(20, 0), "fmnist-train", bootstrap=None)

    def no_dataset(*args, **kwargs):
        raise FileNotFoundError("Fashion-MNIST (train) not found")

    monkeypatch.setattr(modiff.datasets, "_load_raw", no_dataset)
    monkeypatch.setattr(modiff.datasets, "has_raw", lambda *args, **kwargs: False)
    result = compute_metrics(_images(20, 0), "fmnist-train", bootstrap=None)
    assert {"fid", "is_mean", "kid", "kid_mean", "precision", "recall"} <= set(result)
    assert result["kid_prc_reference"] == with_images["kid_prc_reference"] == "fmnist-test"
    against_test = compute_metrics(_images(20, 0), "fmnist-test", ["kid", "prc"], bootstrap=None)
    for key in ("precision", "recall", "kid", "kid_mean"):
        assert result[key] == against_test[key] == with_images[key], key


def test_progress_is_shown_on_request(user_cache: Path, capfd) -> None:
    compute_metrics(_images(20, 0), "fmnist-test", ["fid"], progress=True)
    assert "Processing samples" in capfd.readouterr().err
    compute_metrics(_images(20, 0), "fmnist-test", ["fid"])
    assert "Processing samples" not in capfd.readouterr().err


@pytest.fixture
def other_weights(tmp_path: Path) -> str:
    """A random-weight classifier, saved as the classifier folders are (FOLDER/model.safetensors)."""
    from safetensors.torch import save_file

    from modiff.metrics.classifier import FMNISTClassifier

    torch.manual_seed(123)
    folder = tmp_path / "other-classifier"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in FMNISTClassifier().state_dict().items()}, str(folder / "model.safetensors"))
    return str(folder / "model.safetensors")


def test_the_shipped_statistics_are_recorded_with_the_shipped_classifiers_checksum() -> None:
    """The record that says which classifier the shipped statistics and features belong to names the shipped
    classifier (a classifier retrained and committed without new statistics fails here)."""
    record = json.loads((fidelity.shipped_cache() / fidelity.SHIPPED_WEIGHTS).read_text())
    assert record == {fidelity.EXTRACTOR: fidelity.extractor_weights(fidelity.EXTRACTOR, None)}


def test_other_classifier_weights_get_a_cache_of_their_own(user_cache: Path, other_weights: str) -> None:
    """torch-fidelity names its cache files by input and extractor only: the statistics and features cached
    for one classifier must never be read for another (``--weights``, or a retrained classifier)."""
    shipped, other = fidelity.cache_root(), fidelity.cache_root(fidelity.EXTRACTOR, other_weights)
    assert other != shipped and other.parent == shipped.parent == user_cache
    assert any(shipped.glob("*.pt")) and not any(other.glob("*.pt"))  # the shipped files seed their own folder only
    with pytest.raises(ValueError, match="model.safetensors"):
        fidelity.cache_root(fidelity.EXTRACTOR, str(Path(other_weights).with_name("other.safetensors")))


@pytest.mark.skipif(not modiff.datasets.has_raw("test"), reason="needs the Fashion-MNIST test images")
def test_fid_against_a_named_reference_uses_the_weights_asked_for(user_cache: Path, other_weights: str) -> None:
    """FID of test images against fmnist-test with other classifier weights equals FID against the same
    reference images passed as an array (its statistics computed with those weights); it was 71.6 at 2,000
    images when the shipped classifier's cached statistics were read for any weights."""
    test_images = fidelity._fmnist_split("test")("", False).images
    named = compute_metrics(test_images[:500], "fmnist-test", ["fid"], weights=other_weights, bootstrap=None)
    direct = compute_metrics(test_images[:500], test_images, ["fid"], weights=other_weights, bootstrap=None)
    assert named["fid"] == pytest.approx(direct["fid"], abs=1e-4)


def test_a_statistics_file_of_other_weights_is_refused(tmp_path: Path, user_cache: Path, other_weights: str) -> None:
    images = _images(40, 1)
    path = fidelity.save_reference_stats(images, tmp_path / "ref.npz", weights=other_weights)
    assert compute_metrics(images, path, ["fid"], weights=other_weights, bootstrap=None)["fid"] < 1e-3
    with pytest.raises(ValueError, match="other fmnist-classifier weights"):
        compute_metrics(images, path, ["fid"], bootstrap=None)


def test_a_statistics_file_without_recorded_weights_is_still_read(tmp_path: Path, user_cache: Path,
                                                                   other_weights: str) -> None:
    """Files written before the weights were recorded carry no checksum: read as before, not refused."""
    images = _images(40, 1)
    path = fidelity.save_reference_stats(images, tmp_path / "ref.npz", weights=other_weights)
    with np.load(path) as stats:
        legacy = {k: stats[k] for k in stats.files if k != "weights_sha256"}
    np.savez(tmp_path / "legacy.npz", **legacy)
    assert compute_metrics(images, tmp_path / "legacy.npz", ["fid"], weights=other_weights, bootstrap=None)["fid"] < 1e-3


@pytest.mark.skipif(not (modiff.datasets.has_raw("train") and modiff.datasets.has_raw("test")),
                    reason="needs the Fashion-MNIST images")
def test_the_floor_scores_real_images_against_the_reference_each_row_is_scored_against(user_cache: Path) -> None:
    """Real images against real images: FID near 0, KID's interval holds 0, precision and recall high,
    every score with its interval; KID and precision/recall against fmnist-test, as a row's."""
    floor = fidelity.reference_floor()
    assert floor["kid_precision_recall"].endswith("against fmnist-test (10,000)")
    assert 0 <= floor["fid"] < 0.1 and floor["kid_ci95_low"] < 0 < floor["kid_ci95_high"]
    for key in ("fid", "is", "kid", "precision", "recall", "f_score"):
        value = floor["is_mean" if key == "is" else key]
        assert floor[f"{key}_ci95_low"] <= value <= floor[f"{key}_ci95_high"], key
    assert floor["precision"] > 0.7 and floor["recall"] > 0.7
