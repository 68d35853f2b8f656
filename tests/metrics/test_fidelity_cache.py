"""Where the metrics cache features (issue 23): a user cache folder, never the checkout; KID and
precision/recall against fmnist-train without the Fashion-MNIST images; progress on stderr."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

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
    assert fidelity.cache_root() == user_cache
    assert {p.name for p in fidelity.shipped_cache().glob("*.pt")} <= {p.name for p in user_cache.iterdir()}
    compute_metrics(_images(20, 0), "fmnist-test", ["fid", "kid"])
    assert _snapshot(fidelity.shipped_cache()) == shipped


def test_kid_and_prc_against_fmnist_train_without_the_images(user_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog) -> None:
    """Default metrics against fmnist-train with only its statistics: FID from them, KID and
    precision/recall from the shipped fmnist-test features, with a logged note and a key in the result."""
    def no_dataset(*args, **kwargs):
        raise FileNotFoundError("Fashion-MNIST (train) not found")

    monkeypatch.setattr(modiff.datasets, "_load_raw", no_dataset)
    monkeypatch.setattr(modiff.datasets, "has_raw", lambda *args, **kwargs: False)
    with caplog.at_level(logging.WARNING):
        result = compute_metrics(_images(20, 0), "fmnist-train")
    assert {"fid", "is_mean", "kid_mean", "precision", "recall"} <= set(result)
    assert result["kid_prc_reference"] == "fmnist-test" and "computed against fmnist-test" in caplog.text
    against_test = compute_metrics(_images(20, 0), "fmnist-test", ["kid", "prc"])
    assert result["precision"] == against_test["precision"] and result["kid_mean"] == against_test["kid_mean"]


def test_progress_is_shown_on_request(user_cache: Path, capfd) -> None:
    compute_metrics(_images(20, 0), "fmnist-test", ["fid"], progress=True)
    assert "Processing samples" in capfd.readouterr().err
    compute_metrics(_images(20, 0), "fmnist-test", ["fid"])
    assert "Processing samples" not in capfd.readouterr().err
