"""FID, IS, KID and precision/recall through torch-fidelity, in Fashion-MNIST-classifier feature space.

The classifier's 128-d penultimate features (FID, KID, precision/recall) and its logits (IS) are
registered with torch-fidelity as the feature extractor ``fmnist-classifier``; the Fashion-MNIST splits
are registered as the inputs ``fmnist-train`` and ``fmnist-test``. Scores in this space are NOT comparable
with Inception FID: every output names its feature space. The Inception path (``inception-v3-compat``)
stays available for users with real data and the Inception weights.

Inputs: a folder of images, an ``.npz`` of uint8 images (the guided-diffusion format: ``arr_0`` or
``images``, (N, H, W, C)), a (N, H, W, C) uint8 array, or a reference name. A reference may also be a
statistics file written by `save_reference_stats` (FID only).

Features come from torch-fidelity's extractor and cache, FID, IS and KID's subset average from its
functions; KID over all samples (`modiff.metrics.kid`) and precision/recall
(`modiff.metrics.precision_recall`) are torch-fidelity's estimators computed here, equal to its own (tested),
so that every bootstrap resample is scored in seconds and a reference's own terms once per process.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from modiff.metrics.extractor import extractor_class
from modiff.metrics.bootstrap import CI_METHOD, BootstrapConfig, fid_resamples, recentred_interval, resample_indices
from modiff.metrics.kid import kid_resamples, reference_kernel_sum
from modiff.metrics.precision_recall import precision_recall_resamples, reference_radii
from modiff.utils.paths import data_dir

__all__ = [
    "EXTRACTOR", "FEATURE_SPACE", "Metric", "UInt8Images", "load_images", "compute_metrics", "reference_names",
    "save_reference_stats", "frechet_distance", "classifier_features", "score", "Scores", "inception_score_resamples",
    "extractor_weights", "shipped_weights",
]


EXTRACTOR = "fmnist-classifier"
INCEPTION = "inception-v3-compat"
FEATURE_SPACE = {EXTRACTOR: "Fashion-MNIST-classifier feature space (128-d)", INCEPTION: "Inception-v3 pool3 (2048-d)"}
Metric = Literal["fid", "isc", "kid", "prc"]
MIN_IMAGES = 10
IS_SPLIT_IMAGES = 1000
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
        register_feature_extractor(EXTRACTOR, extractor_class())
    for name in reference_names():
        if name not in DATASETS_REGISTRY:
            register_dataset(name, _fmnist_split(name.split("-")[1]))


def shipped_cache() -> Path:
    """The statistics and features that ship in the repository (read-only: never written)."""
    from modiff.utils.paths import data_dir

    return data_dir() / "fidelity-cache"


SHIPPED_WEIGHTS = "weights.json"  # in `shipped_cache`: the SHA-256 of the classifier its files were made with


def extractor_weights(extractor: str, weights: Optional[str]) -> str:
    """Which weights ``extractor`` loads, as the SHA-256 of their file ("torch-fidelity-default" for
    torch-fidelity's own Inception weights): what cached statistics and features are kept under, since
    torch-fidelity names its cache files by input and extractor only. The classifier reads the
    ``model.safetensors`` of a folder, so ``weights`` must name that file."""
    from modiff.utils.checksums import sha256_file

    if extractor == INCEPTION and not weights:
        return "torch-fidelity-default"
    if extractor == EXTRACTOR and weights and Path(weights).name != "model.safetensors":
        raise ValueError(f"the classifier loads the model.safetensors of a folder (with its manifest); got "
                         f"{weights}: pass FOLDER/model.safetensors")
    path = Path(weights) if weights else data_dir() / "fmnist-classifier" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"feature-extractor weights missing: {path}")
    return sha256_file(path)


def shipped_weights(extractor: str = EXTRACTOR) -> Optional[str]:
    """The SHA-256 of the weights the shipped statistics and features of ``extractor`` were made with (None
    where none ship)."""
    import json

    record = shipped_cache() / SHIPPED_WEIGHTS
    return json.loads(record.read_text()).get(extractor) if record.is_file() else None


def cache_root(extractor: str = EXTRACTOR, weights: Optional[str] = None) -> Path:
    """torch-fidelity's cache for these extractor weights (`extractor_weights`):
    ``$XDG_CACHE_HOME/modiff/fidelity/<first 16 hex digits>`` (default ``~/.cache/...``), never a folder of
    the checkout or the installed package. Statistics and features of one classifier are never read for
    another (a retrained classifier, ``--weights``). The shipped statistics and features are copied, the first
    time, into the folder of the classifier they were made with."""
    import os
    import shutil

    from modiff.utils.runs import atomic_path

    digest = extractor_weights(extractor, weights)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = base / "modiff" / "fidelity" / digest[:16]
    root.mkdir(parents=True, exist_ok=True)
    if shipped_weights(extractor) == digest:
        for shipped in shipped_cache().glob("*.pt"):
            if not (root / shipped.name).exists():
                with atomic_path(root / shipped.name) as tmp:
                    shutil.copyfile(shipped, tmp)
    return root


def _features_reference(ref: str, extractor: str) -> str:
    """The named reference KID and precision/recall use: for the classifier, fmnist-test whichever split
    was named. Its features ship, so these scores are the same on a machine without the Fashion-MNIST
    images (the GPU machines) as on one with them, and its 10,000 samples match a paper row's 10,000
    (precision/recall's radii depend on the sizes of both sets). FID keeps the named split's statistics."""
    return "fmnist-test" if extractor == EXTRACTOR else ref


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
        "cache_root": str(cache_root(extractor, weights)), "verbose": progress, "save_cpu_ram": True,
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
    np.savez(path, mu=mu, sigma=sigma, extractor=extractor, layer=layer, num_images=len(images),
             weights_sha256=extractor_weights(extractor, weights))
    return path


def _stats_file(path: Path, extractor: str, weights: Optional[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu, sigma, layer) of a statistics file written by `save_reference_stats` for ``extractor`` with
    these ``weights`` (files written before the weights were recorded are taken on trust)."""
    with np.load(path) as stats:
        if "mu" not in stats or "sigma" not in stats:
            raise ValueError(f"{path} is not a statistics file (expected mu and sigma, got {list(stats)})")
        made_by = str(stats["extractor"]) if "extractor" in stats else "unknown"
        if made_by != extractor:
            raise ValueError(f"{path} holds statistics from the feature extractor {made_by!r}, but {extractor!r} "
                             f"was asked for; recompute them with `save_reference_stats` for {extractor!r}")
        if "weights_sha256" in stats and str(stats["weights_sha256"]) != extractor_weights(extractor, weights):
            raise ValueError(f"{path} holds statistics from other {extractor} weights than the ones asked for "
                             f"({weights or 'the shipped ones'}); recompute them with `save_reference_stats` "
                             f"and these weights")
        return stats["mu"], stats["sigma"], str(stats["layer"])


@dataclass(frozen=True)
class Scores:
    """What `score` returns: the metrics dict (fixed keys, see `compute_metrics`) and, per metric with a
    bootstrap interval (fid, kid, precision, recall, f_score; not IS), its value on every resample, for
    paired comparisons of sets made from the same seeds."""

    metrics: dict[str, Any]
    resamples: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def fid_resamples(self) -> Optional[np.ndarray]:
        return self.resamples.get("fid")


def _is_stats_file(ref: ImageInput) -> bool:
    return isinstance(ref, (str, Path)) and str(ref).endswith(".npz") and "mu" in np.load(ref).files


def _second_input(ref: ImageInput, stats_file: bool) -> tuple[Any, int]:
    """torch-fidelity's input2 for ``ref`` (None for a statistics file) and the reference size."""
    if stats_file:
        return None, 0
    if isinstance(ref, str) and ref in reference_names():
        return ref, _named_size(ref)
    ref_images = load_images(ref)
    _check_count(ref_images, "the reference")
    return UInt8Images(ref_images), len(ref_images)


def _named_size(ref: str) -> int:
    return 10_000 if ref == "fmnist-test" else 60_000


def _with_fid(result: dict[str, Any], fid: float, features: torch.Tensor, mu_ref: np.ndarray, sigma_ref: np.ndarray,
              bootstrap: Optional[BootstrapConfig]) -> Optional[np.ndarray]:
    """Put FID (and, with ``bootstrap``, its interval) into ``result``; returns the resampled FIDs."""
    result["fid"] = fid
    if bootstrap is None:
        return None
    resampled = fid_resamples(features, mu_ref, sigma_ref, resample_indices(len(features), bootstrap))
    result["fid_ci95_low"], result["fid_ci95_high"] = recentred_interval(fid, resampled, bootstrap.level)
    result.update(fid_ci_level=bootstrap.level, fid_bootstrap_resamples=bootstrap.resamples,
                  fid_bootstrap_seed=bootstrap.seed, fid_ci_method=CI_METHOD)
    return resampled


_REFERENCE_TERMS: "OrderedDict[str, dict[str, Any]]" = OrderedDict()  # by features fingerprint, a few at most


def _reference_terms(ref_features: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """What KID and precision/recall need of the reference alone (its kernel sum, its radii), computed once
    per reference per process: against 60,000 reference images the two took 81 s on the 2-core CPU."""
    key = hashlib.sha1(ref_features.cpu().numpy().tobytes()).hexdigest()
    if key not in _REFERENCE_TERMS:
        y = ref_features.to(device)
        _REFERENCE_TERMS[key] = {"kernel_sum": reference_kernel_sum(y), "radii": reference_radii(y)}
        while len(_REFERENCE_TERMS) > 4:
            _REFERENCE_TERMS.popitem(last=False)
    return _REFERENCE_TERMS[key]


def _kid_prc(result: dict[str, Any], features: torch.Tensor, ref_features: torch.Tensor, metrics: Sequence[Metric],
             bootstrap: Optional[BootstrapConfig], device: torch.device) -> dict[str, np.ndarray]:
    """KID over all samples and precision/recall/f_score into ``result``, with their intervals under
    ``bootstrap`` (each resample scored by the unchanged estimator, the interval recentred as FID's);
    returns the resampled values by metric."""
    terms = _reference_terms(ref_features, device)
    x, y = features.to(device), ref_features.to(device)
    indices = np.arange(len(x))[None] if bootstrap is None else \
        np.concatenate([np.arange(len(x))[None], resample_indices(len(x), bootstrap)])
    values: dict[str, np.ndarray] = {}
    if "kid" in metrics:
        values["kid"] = kid_resamples(x, y, indices, terms["kernel_sum"])
    if "prc" in metrics:
        precision, recall = precision_recall_resamples(x, y, indices, terms["radii"])
        f_score = 2 * precision * recall / np.maximum(1e-5, precision + recall)  # torch-fidelity's guard
        values.update(precision=precision, recall=recall, f_score=f_score)
    for name, row in values.items():
        result[name] = float(row[0])
        if bootstrap is not None:
            low, high = recentred_interval(row[0], row[1:], bootstrap.level)
            if name != "kid":  # shares: a recentred interval can pass 0 or 1 at a few samples
                low, high = max(low, 0.0), min(high, 1.0)
            result[f"{name}_ci95_low"], result[f"{name}_ci95_high"] = low, high
    return {name: row[1:] for name, row in values.items()} if bootstrap is not None else {}


def inception_score_resamples(logits: torch.Tensor, indices: np.ndarray, splits: int = 10, shuffle: bool = True,
                              rng_seed: int = 2020) -> np.ndarray:
    """torch-fidelity's Inception Score (the same splits, shuffle and seed) of each resample of ``logits``
    (N, classes), one per row of ``indices`` (`modiff.metrics.bootstrap.resample_indices`)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    scores = (isc_features_to_metric(logits[torch.from_numpy(rows)], splits, shuffle, rng_seed) for rows in indices)
    return np.array([s[KEY_METRIC_ISC_MEAN] for s in scores])


def is_splits(n: int) -> int:
    """How many splits IS is averaged over for ``n`` images: torch-fidelity's 10 where each holds at least
    `IS_SPLIT_IMAGES` images, fewer below 10,000 images and one below 2,000. IS over a small split is biased
    toward 1 (one image's IS is exactly 1): 12 real Fashion-MNIST test images in 10 splits gave 1.16, in one
    split 4.5; 10,000 of them give 5.5."""
    return max(1, min(10, n // IS_SPLIT_IMAGES))


def _with_is_interval(result: dict[str, Any], logits: torch.Tensor, kwargs: dict[str, Any],
                      bootstrap: BootstrapConfig) -> None:
    """IS's interval, resampled and recentred as FID's (the samples drawn with replacement, the estimator
    unchanged), into ``result``."""
    from torch_fidelity.helpers import get_kwarg

    resampled = inception_score_resamples(logits, resample_indices(len(logits), bootstrap),
                                          get_kwarg("isc_splits", kwargs), get_kwarg("samples_shuffle", kwargs),
                                          get_kwarg("rng_seed", kwargs))
    result["is_ci95_low"], result["is_ci95_high"] = recentred_interval(result["is_mean"], resampled, bootstrap.level)


def _reference_fid_stats(ref: ImageInput, stats_file: bool, other: Optional[dict], feat_extractor: Any, layer: str,
                         kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference, as torch-fidelity gets them (its cache for a named reference);
    ``other`` holds the reference's features when they were extracted (None otherwise)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached, fid_input_id_to_statistics_cached
    from torch_fidelity.utils import get_cacheable_input_name

    if stats_file:
        mu, sigma, _ = _stats_file(Path(ref), kwargs["feature_extractor"], kwargs.get("feature_extractor_weights_path"))
        return mu, sigma
    if other is None:
        stats = fid_input_id_to_statistics_cached(2, feat_extractor, layer, **kwargs)
    else:
        stats = fid_featuresdict_to_statistics_cached(other, get_cacheable_input_name(2, **kwargs), feat_extractor,
                                                      layer, **kwargs)
    return stats["mu"], stats["sigma"]


def _other_features(ref: ImageInput, extractor: str, feat_extractor: Any, kwargs: dict[str, Any],
                    result: dict[str, Any]) -> tuple[dict, bool]:
    """The features KID and precision/recall compare against, and whether they are ``ref``'s own. For a
    named reference other than fmnist-test they are fmnist-test's (`_features_reference`), named in
    ``result["kid_prc_reference"]``."""
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    named = isinstance(ref, str) and ref in reference_names()
    features_ref = _features_reference(ref, extractor) if named else ref
    if not named or features_ref == ref:
        return extract_featuresdict_from_input_id_cached(2, feat_extractor, **kwargs), True
    result["kid_prc_reference"] = features_ref
    subset = min(kwargs["kid_subset_size"], _named_size(features_ref))
    other_kwargs = dict(kwargs, input2=features_ref, kid_subset_size=subset)
    return extract_featuresdict_from_input_id_cached(2, feat_extractor, **other_kwargs), False


def score(samples: ImageInput, ref: ImageInput, metrics: Sequence[Metric] = ("fid", "isc", "kid", "prc"), *,
          extractor: str = EXTRACTOR, batch_size: int = 250, device: str = "cpu", weights: Optional[str] = None,
          bootstrap: Optional[BootstrapConfig] = BootstrapConfig(), progress: bool = False) -> Scores:
    """`compute_metrics` with the FID of every bootstrap resample: the features of ``samples`` are
    extracted once (torch-fidelity's extractor and its featuresdict functions, as `calculate_metrics`
    uses them) and serve every metric and the bootstrap."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    unknown = set(metrics) - set(get_args(Metric))
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; allowed: {', '.join(get_args(Metric))}")
    _register()
    images = load_images(samples)
    _check_count(images, "the samples")
    stats_file = _is_stats_file(ref)
    if stats_file and set(metrics) != {"fid"}:
        raise ValueError("a statistics file supports FID only; pass metrics=('fid',) or a reference image set")
    input2, n_ref = _second_input(ref, stats_file)
    kwargs = _common_kwargs(extractor, batch_size, torch.device(device), weights, progress)
    kwargs.update(input1=UInt8Images(images), input2=input2, kid_subset_size=min(1000, len(images), n_ref or 1000),
                  isc_splits=is_splits(len(images)))
    layers = {m: FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric(m) for m in metrics}
    if stats_file:
        layers["fid"] = _stats_file(Path(ref), extractor, weights)[2]
    feat_extractor = create_feature_extractor(extractor, sorted(set(layers.values())),
                                              **{k: v for k, v in kwargs.items() if k != "feature_extractor"})
    own = extract_featuresdict_from_input_id_cached(1, feat_extractor, **kwargs)  # the one feature pass
    result: dict[str, Any] = {"feature_space": FEATURE_SPACE.get(extractor, extractor), "extractor": extractor,
                              "num_samples": len(images), "reference": str(ref)}
    other, own_ref = _other_features(ref, extractor, feat_extractor, kwargs, result) \
        if {"kid", "prc"} & set(metrics) else (None, False)
    raw: dict[str, Any] = {}
    if "isc" in metrics:
        raw.update(isc_featuresdict_to_metric(own, layers["isc"], **kwargs))
        result["is_splits"] = kwargs["isc_splits"]
    if "kid" in metrics:
        raw.update(kid_featuresdict_to_metric(own, other, layers["kid"], **kwargs))
    result.update({_RENAME[k]: float(v) for k, v in raw.items() if k in _RENAME})
    if "isc" in metrics and bootstrap is not None:
        _with_is_interval(result, own[layers["isc"]], kwargs, bootstrap)
    resamples: dict[str, np.ndarray] = {}
    if {"kid", "prc"} & set(metrics):
        layer = layers["kid"] if "kid" in metrics else layers["prc"]
        resamples.update(_kid_prc(result, own[layer], other[layer], metrics, bootstrap, torch.device(device)))
    if "fid" in metrics:
        mu_ref, sigma_ref = _reference_fid_stats(ref, stats_file, other if own_ref else None, feat_extractor,
                                                 layers["fid"], kwargs)
        features = own[layers["fid"]]
        fid = frechet_distance(*_stats(features), mu_ref, sigma_ref) if stats_file else fid_statistics_to_metric(
            fid_features_to_statistics(features), {"mu": mu_ref, "sigma": sigma_ref}, False)["frechet_inception_distance"]
        resampled = _with_fid(result, float(fid), features, mu_ref, sigma_ref, bootstrap)
        if resampled is not None:
            resamples["fid"] = resampled
    return Scores(_checked(result), resamples)


def compute_metrics(samples: ImageInput, ref: ImageInput, metrics: Sequence[Metric] = ("fid", "isc", "kid", "prc"), *,
                    extractor: str = EXTRACTOR, batch_size: int = 250, device: str = "cpu",
                    weights: Optional[str] = None, bootstrap: Optional[BootstrapConfig] = BootstrapConfig(),
                    progress: bool = False) -> dict[str, Any]:
    """Scores of `samples` against `ref` (a reference name, a folder, an .npz of images or a stats file).

    Returns fixed keys: fid, is_mean, is_std (the std over is_splits splits, torch-fidelity's; `is_splits`), kid
    (over all samples, `modiff.metrics.kid`), kid_mean and kid_std (torch-fidelity's average and spread over
    100 subsets), precision, recall, f_score (those asked for), with feature_space, extractor, num_samples and
    reference. With ``bootstrap`` (the default) each metric asked for gets {name}_ci95_low and {name}_ci95_high:
    every resample of the generated samples (reference fixed) scored by the unchanged estimator, the
    percentile interval recentred on the estimate (`modiff.metrics.bootstrap`; for IS is_ci95_*, for KID
    kid_ci95_* about ``kid``; precision, recall and f_score through
    `modiff.metrics.precision_recall`); with FID also fid_ci_level, fid_bootstrap_resamples,
    fid_bootstrap_seed and fid_ci_method, which hold for every interval.
    A named reference needs only its cached statistics for FID and IS. Against ``fmnist-train``, KID and
    precision/recall use the shipped features of ``fmnist-test`` (with or without the Fashion-MNIST images:
    the same scores on every machine) and the result says so (``kid_prc_reference``). ``progress`` shows
    torch-fidelity's progress bars (on stderr)
    while features are extracted. Refuses NaN results.
    """
    return score(samples, ref, metrics, extractor=extractor, batch_size=batch_size, device=device, weights=weights,
                 bootstrap=bootstrap, progress=progress).metrics


def _checked(result: dict[str, Any]) -> dict[str, Any]:
    bad = [k for k, v in result.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:
        raise ValueError(f"metrics {bad} came out non-finite; the inputs are degenerate (see the samples)")
    return result


FLOOR_SIZE = 10_000


def reference_floor(batch_size: int = 250, device: str = "cpu") -> dict[str, Any]:
    """The scores a perfect model would reach, each against the reference a row of 10,000 samples is scored
    against, with 95% intervals: FID and IS of the test set (10,000) against fmnist-train's statistics;
    KID and precision/recall of the first 10,000 training images against fmnist-test
    (`_features_reference`). Needs the Fashion-MNIST images; caches the splits' statistics in the user
    cache (`cache_root`)."""
    from modiff.datasets import _load_raw

    test, train = (_load_raw(split, None)[0][:FLOOR_SIZE, ..., None] for split in ("test", "train"))
    out: dict[str, Any] = {"feature_space": FEATURE_SPACE[EXTRACTOR], "extractor": EXTRACTOR,
                           "fid_is": "fmnist-test (10,000) against fmnist-train (60,000)",
                           "kid_precision_recall": "fmnist-train's first 10,000 against fmnist-test (10,000)"}
    fid_is = compute_metrics(test, "fmnist-train", ("fid", "isc"), batch_size=batch_size, device=device)
    kid_prc = compute_metrics(train, "fmnist-test", ("kid", "prc"), batch_size=batch_size, device=device)
    out.update({k: v for k, v in fid_is.items() if k.startswith(("fid", "is_"))})
    out.update({k: v for k, v in kid_prc.items() if k.startswith(("kid", "precision", "recall", "f_score"))})
    return out
