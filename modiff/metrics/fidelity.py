"""FID, IS, KID and precision/recall through torch-fidelity, in Fashion-MNIST-classifier feature space.

The classifier's 128-d penultimate features (FID, KID, precision/recall) and its logits (IS) are
registered with torch-fidelity as the feature extractor ``fmnist-classifier``; the Fashion-MNIST splits
are registered as the inputs ``fmnist-train`` and ``fmnist-test``. Scores in this space are NOT comparable
with Inception FID: every output names its feature space. The Inception path (``inception-v3-compat``)
stays available for users with real data and the Inception weights.

Inputs: a folder of images, an ``.npz`` of uint8 images (the guided-diffusion format: ``arr_0`` or
``images``, (N, H, W, C)), a (N, H, W, C) uint8 array, or a reference name. A reference may also be a
statistics file written by `save_reference_stats` (FID only).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "EXTRACTOR", "FEATURE_SPACE", "Metric", "UInt8Images", "load_images", "compute_metrics", "reference_names",
    "save_reference_stats", "frechet_distance", "classifier_features",
]

log = logging.getLogger(__name__)

EXTRACTOR = "fmnist-classifier"
INCEPTION = "inception-v3-compat"
FEATURE_SPACE = {EXTRACTOR: "Fashion-MNIST-classifier feature space (128-d)", INCEPTION: "Inception-v3 pool3 (2048-d)"}
Metric = Literal["fid", "isc", "kid", "prc"]
MIN_IMAGES = 10
ImageInput = Union[str, Path, np.ndarray]


class UInt8Images(Dataset):
    """(N, H, W, C) uint8 images as the (C, H, W) uint8 tensors torch-fidelity reads."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)


def _folder_images(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    if not files:
        raise ValueError(f"no images (.png, .jpg, .jpeg, .bmp) in {folder}")
    arrays, kinds = [], {}
    for path in files:
        try:
            with Image.open(path) as img:
                kinds.setdefault((img.size, img.mode), path.name)
                arrays.append(np.asarray(img))
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"{path} is not a readable image ({err}); delete it, or for a run folder run the same "
                             f"`modiff sample` command again, which makes unreadable images again") from None
    if len(kinds) > 1:
        found = ", ".join(f"{size[0]}x{size[1]} {mode} (e.g. {name})" for (size, mode), name in kinds.items())
        raise ValueError(f"{folder} mixes image sizes or modes: {found}; all images must share one size and mode")
    stacked = np.stack(arrays)
    return stacked[..., None] if stacked.ndim == 3 else stacked


def load_images(source: ImageInput) -> np.ndarray:
    """(N, H, W, C) uint8 from a folder, an .npz or an array; refuses NaN, non-uint8 and empty input."""
    if isinstance(source, np.ndarray):
        images = source
    else:
        path = Path(source)
        if path.is_dir():
            images = _folder_images(path)
        elif path.suffix == ".npz" and path.is_file():
            with np.load(path) as data:
                key = "images" if "images" in data else "arr_0"
                if key not in data:
                    raise ValueError(f"{path} holds neither 'images' nor 'arr_0' (keys: {list(data)})")
                images = data[key]
        else:
            raise ValueError(f"{source} is neither an image folder nor an .npz file")
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any():
            raise ValueError("the images contain NaN values; the sampler diverged: no metric is computed")
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) with C in {{1, 3}}, got shape {images.shape}")
    return images


def _check_count(images: np.ndarray, what: str) -> None:
    if len(images) < MIN_IMAGES:
        raise ValueError(f"{what} holds {len(images)} images; the metrics need at least {MIN_IMAGES}")
    if np.all(images == images[:1]):
        raise ValueError(f"all {len(images)} images of {what} are identical: the feature covariance is singular "
                         f"and FID/KID would be meaningless")


def _extractor_class() -> type:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class FMNISTFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity adapter: uint8 (B, C, H, W) -> (penultimate (B, 128), logits (B, 10))."""

        def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: Optional[str] = None, **kwargs: Any):
            from modiff.metrics.classifier import load_classifier

            super().__init__(name, features_list)
            self.classifier = load_classifier(Path(feature_extractor_weights_path).parent if feature_extractor_weights_path else None)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("penultimate", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits_unbiased" if metric == "isc" else "penultimate"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if x.dtype != torch.uint8:
                raise TypeError(f"the feature extractor takes uint8 images, got {x.dtype}")
            gray = x[:, :1].float() / 127.5 - 1.0  # RGB copies of a gray image: one channel suffices
            pad_h, pad_w = 32 - gray.shape[2], 32 - gray.shape[3]
            if pad_h < 0 or pad_w < 0:
                raise ValueError(f"the classifier takes images up to 32x32, got {tuple(gray.shape[2:])}")
            gray = F.pad(gray, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
            features, logits = self.classifier(gray)
            out = {"penultimate": features, "logits_unbiased": logits}
            return tuple(out[name] for name in self.features_list)

    return FMNISTFeatureExtractor


def _fmnist_split(split: str):
    def create(root: str, download: bool) -> Dataset:
        from modiff.datasets import _load_raw

        images, _ = _load_raw(split, None)
        return UInt8Images(images[..., None])

    return create


def reference_names() -> tuple[str, ...]:
    return ("fmnist-train", "fmnist-test")


def _register() -> None:
    """Add our extractor and datasets to torch-fidelity's registries (once per process)."""
    from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY, register_dataset, register_feature_extractor

    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, _extractor_class())
    for name in reference_names():
        if name not in DATASETS_REGISTRY:
            register_dataset(name, _fmnist_split(name.split("-")[1]))


def shipped_cache() -> Path:
    """The statistics and features that ship in the repository (read-only: never written)."""
    from modiff.utils.paths import data_dir

    return data_dir() / "fidelity-cache"


def cache_root() -> Path:
    """torch-fidelity's cache: ``$XDG_CACHE_HOME/modiff/fidelity`` (default ``~/.cache/modiff/fidelity``),
    never a folder of the checkout or the installed package. The shipped statistics and features are
    copied into it the first time."""
    import os
    import shutil

    from modiff.utils.runs import atomic_path

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = base / "modiff" / "fidelity"
    root.mkdir(parents=True, exist_ok=True)
    for shipped in shipped_cache().glob("*.pt"):
        if not (root / shipped.name).exists():
            with atomic_path(root / shipped.name) as tmp:
                shutil.copyfile(shipped, tmp)
    return root


def _features_reference(ref: str, extractor: str) -> str:
    """The named reference KID and precision/recall use: ``ref``, unless its features are neither cached
    nor computable (fmnist-train without the Fashion-MNIST images), then fmnist-test, whose features ship."""
    from modiff.datasets import has_raw

    split = ref.split("-")[1]
    if extractor != EXTRACTOR or ref == "fmnist-test" or has_raw(split):
        return ref
    if (cache_root() / f"{ref}-{extractor}-features-penultimate.pt").exists():
        return ref
    log.warning("KID and precision/recall need the features of %s's images, which are not cached, and the "
                "Fashion-MNIST images are not here: they are computed against fmnist-test (its features ship) "
                "instead; FID still uses %s's shipped statistics (see kid_prc_reference in the result)", ref, ref)
    return "fmnist-test"


def _require_inception_weights(weights: Optional[str]) -> None:
    """Offline, torch-fidelity would try to download the Inception weights: say which file is missing."""
    import os

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights file {weights} does not exist")
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
    if not cached.is_file():
        raise FileNotFoundError(
            f"the Inception-v3 weights are missing: expected {cached} (torch-fidelity's cache). Download "
            f"{URL_INCEPTION_V3} on a machine with a network and put it there, or pass --weights FILE."
        )


def _common_kwargs(extractor: str, batch_size: int, device: torch.device, weights: Optional[str],
                   progress: bool = False) -> dict[str, Any]:
    if extractor == INCEPTION:
        _require_inception_weights(weights)
    kwargs: dict[str, Any] = {
        "feature_extractor": extractor, "batch_size": batch_size, "cuda": device.type == "cuda",
        "cache_root": str(cache_root()), "verbose": progress, "save_cpu_ram": True,
    }
    if weights:
        kwargs["feature_extractor_weights_path"] = weights
    return kwargs


_RENAME = {
    "frechet_inception_distance": "fid", "inception_score_mean": "is_mean", "inception_score_std": "is_std",
    "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std",
    "precision": "precision", "recall": "recall", "f_score": "f_score",
}


def _features(images: np.ndarray, extractor: str, layer: str, batch_size: int, device: torch.device,
              weights: Optional[str]) -> torch.Tensor:
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    kwargs = _common_kwargs(extractor, batch_size, device, weights)
    model = create_feature_extractor(extractor, [layer], cuda=kwargs.pop("cuda"), **kwargs)
    features = get_featuresdict_from_dataset(UInt8Images(images), model, batch_size, device.type == "cuda", True, False)
    return features[layer]


def classifier_features(images: np.ndarray, batch_size: int = 250, device: str = "cpu") -> torch.Tensor:
    """(N, 128) penultimate features of the Fashion-MNIST classifier for uint8 images."""
    _register()
    return _features(load_images(images), EXTRACTOR, "penultimate", batch_size, torch.device(device), None)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's sqrtm (imaginary round-off dropped)."""
    from scipy import linalg

    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def _stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = features.double().cpu().numpy()
    return x.mean(axis=0), np.cov(x, rowvar=False)


def save_reference_stats(source: ImageInput, path: str | Path, extractor: str = EXTRACTOR, batch_size: int = 250,
                         device: str = "cpu", weights: Optional[str] = None) -> Path:
    """FID statistics (mu, sigma) of a reference set, tagged with the extractor that made them."""
    _register()
    images = load_images(source) if not (isinstance(source, str) and source in reference_names()) else \
        _fmnist_split(source.split("-")[1])("", False).images
    layer = "penultimate" if extractor == EXTRACTOR else "2048"
    mu, sigma = _stats(_features(images, extractor, layer, batch_size, torch.device(device), weights))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, extractor=extractor, layer=layer, num_images=len(images))
    return path


def _fid_from_stats_file(images: np.ndarray, path: Path, extractor: str, batch_size: int, device: torch.device,
                         weights: Optional[str]) -> float:
    with np.load(path) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"{path} is not a statistics file (expected mu and sigma, got {list(stats)})")
        made_by = str(stats["extractor"]) if "extractor" in stats else "unknown"
        if made_by != extractor:
            raise ValueError(f"{path} holds statistics from the feature extractor {made_by!r}, but {extractor!r} "
                             f"was asked for; recompute them with `modiff fid-ref` for {extractor!r}")
        mu2, sigma2, layer = stats["mu"], stats["sigma"], str(stats["layer"])
    mu1, sigma1 = _stats(_features(images, extractor, layer, batch_size, device, weights))
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def compute_metrics(samples: ImageInput, ref: ImageInput, metrics: Sequence[Metric] = ("fid", "isc", "kid", "prc"), *,
                    extractor: str = EXTRACTOR, batch_size: int = 250, device: str = "cpu",
                    weights: Optional[str] = None, progress: bool = False) -> dict[str, Any]:
    """Scores of `samples` against `ref` (a reference name, a folder, an .npz of images or a stats file).

    Against ``fmnist-train`` without the Fashion-MNIST images, KID and precision/recall use the shipped
    features of ``fmnist-test`` and the result says so (``kid_prc_reference``). ``progress`` shows
    torch-fidelity's progress bars (on stderr) while features are extracted.

    Returns fixed keys: fid, is_mean, is_std, kid_mean, kid_std, precision, recall, f_score (those asked
    for), with feature_space, extractor, num_samples and reference. Refuses NaN results.
    """
    unknown = set(metrics) - set(get_args(Metric))
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; allowed: {', '.join(get_args(Metric))}")
    _register()
    dev = torch.device(device)
    images = load_images(samples)
    _check_count(images, "the samples")
    result: dict[str, Any] = {"feature_space": FEATURE_SPACE.get(extractor, extractor), "extractor": extractor,
                              "num_samples": len(images), "reference": str(ref)}
    if isinstance(ref, (str, Path)) and str(ref).endswith(".npz") and "mu" in np.load(ref).files:
        if set(metrics) != {"fid"}:
            raise ValueError("a statistics file supports FID only; pass metrics=('fid',) or a reference image set")
        result["fid"] = _fid_from_stats_file(images, Path(ref), extractor, batch_size, dev, weights)
        return _checked(result)
    kwargs = _common_kwargs(extractor, batch_size, dev, weights, progress)
    if isinstance(ref, str) and ref in reference_names():
        raw = _named_reference_metrics(images, ref, metrics, extractor, kwargs, result)
    else:
        ref_images = load_images(ref)
        _check_count(ref_images, "the reference")
        import torch_fidelity

        raw = torch_fidelity.calculate_metrics(
            input1=UInt8Images(images), input2=UInt8Images(ref_images), fid="fid" in metrics, isc="isc" in metrics,
            kid="kid" in metrics, prc="prc" in metrics, kid_subset_size=min(1000, len(images), len(ref_images)),
            **kwargs)
    result.update({_RENAME[k]: float(v) for k, v in raw.items() if k in _RENAME})
    return _checked(result)


def _named_reference_metrics(images: np.ndarray, ref: str, metrics: Sequence[Metric], extractor: str,
                             kwargs: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Against fmnist-train or fmnist-test, metric by metric: FID needs only the reference's statistics
    (shipped) and IS no reference; KID and precision/recall need its features (`_features_reference`)."""
    import torch_fidelity

    samples = UInt8Images(images)
    raw: dict[str, Any] = {}
    if "fid" in metrics:
        raw.update(torch_fidelity.calculate_metrics(input1=samples, input2=ref, fid=True, **kwargs))
    if "isc" in metrics:
        raw.update(torch_fidelity.calculate_metrics(input1=samples, isc=True, **kwargs))
    if {"kid", "prc"} & set(metrics):
        features_ref = _features_reference(ref, extractor)
        if features_ref != ref:
            result["kid_prc_reference"] = features_ref
        n_ref = 10_000 if features_ref == "fmnist-test" else 60_000
        raw.update(torch_fidelity.calculate_metrics(
            input1=samples, input2=features_ref, kid="kid" in metrics, prc="prc" in metrics,
            kid_subset_size=min(1000, len(images), n_ref), **kwargs))
    return raw


def _checked(result: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k, v in result.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise ValueError(f"metrics {bad} came out non-finite; the inputs are degenerate (see the samples)")
    return result


def reference_floor(batch_size: int = 250, device: str = "cpu") -> dict[str, Any]:
    """Test set (10k) against train set (60k): the scores a perfect model would reach. Caches the
    features and FID statistics of both splits in the user cache (`cache_root`)."""
    import torch_fidelity

    _register()
    raw = torch_fidelity.calculate_metrics(input1="fmnist-test", input2="fmnist-train", fid=True, isc=True, kid=True,
                                           prc=True, cache=True, **_common_kwargs(EXTRACTOR, batch_size, torch.device(device), None))
    out = {"feature_space": FEATURE_SPACE[EXTRACTOR], "extractor": EXTRACTOR, "samples": "fmnist-test (10,000)",
           "reference": "fmnist-train (60,000)"}
    out.update({_RENAME[k]: float(v) for k, v in raw.items() if k in _RENAME})
    return _checked(out)
