"""Fashion-MNIST from idx files, padded to 32x32 and scaled to [-1, 1].

Search order for the idx files (gzipped or not): the directory given (`data_dir=`; `modiff train --data-dir`), the
environment variable MODIFF_DATA_DIR, /usr/share/datasets/fashion-mnist (Debian package
`dataset-fashion-mnist`), the repository's data/fashion-mnist/, and last torchvision's download where a
network exists.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

__all__ = ["Split", "fashion_mnist", "fashion_mnist_dirs", "read_idx", "to_model_range"]

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header announces {ndim} dimensions")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values")
    return data.reshape(dims)


def fashion_mnist_dirs(data_dir: Optional[str | Path] = None) -> list[Path]:
    """The directories searched, in order."""
    from modiff.utils.paths import data_dir as repo_data_dir

    dirs = [Path(d) for d in (data_dir, os.environ.get("MODIFF_DATA_DIR")) if d]
    return dirs + [SYSTEM_DIR, repo_data_dir() / "fashion-mnist"]


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def has_raw(split: Split, data_dir: Optional[str | Path] = None) -> bool:
    """Whether the idx files of ``split`` are in one of the searched folders (no download is tried)."""
    return any(all(_find(folder, stem) for stem in _FILES[split]) for folder in fashion_mnist_dirs(data_dir))


def _download(split: Split) -> Optional[tuple[np.ndarray, np.ndarray]]:
    target = fashion_mnist_dirs()[-1]
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(target.parent / "torchvision"), train=split == "train", download=True)
    except Exception as err:  # no network, or torchvision missing: report below with every place searched
        log.debug("torchvision download failed: %s", err)
        return None
    return ds.data.numpy(), ds.targets.numpy()


def _load_raw(split: Split, data_dir: Optional[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    searched = fashion_mnist_dirs(data_dir)
    for folder in searched:
        images, labels = (_find(folder, stem) for stem in _FILES[split])
        if images and labels:
            log.info("Fashion-MNIST %s from %s", split, folder)
            return read_idx(images), read_idx(labels)
    downloaded = _download(split)
    if downloaded is not None:
        return downloaded
    places = "\n".join(f"  - {p}" for p in searched)
    raise FileNotFoundError(
        f"Fashion-MNIST ({split}) not found. Searched for {_FILES[split][0]}[.gz] in:\n{places}\n"
        f"  - torchvision download (no network?)\n"
        f"Get it with `apt-get install dataset-fashion-mnist`, or put the four idx files in a folder and set "
        f"MODIFF_DATA_DIR=FOLDER (`modiff train` also takes --data-dir FOLDER, Python calls data_dir=FOLDER)."
    )


def to_model_range(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, size, size) in [-1, 1], padded with the background (0 -> -1)."""
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {images.shape}")
    pad_h, pad_w = size - images.shape[1], size - images.shape[2]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"images of {images.shape[1:]} do not fit in {size}x{size}")
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(127.5).sub_(1.0)
    x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
    return x.unsqueeze(1)


def fashion_mnist(split: Split = "train", data_dir: Optional[str | Path] = None, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) float32 in [-1, 1], labels (N,) int64)."""
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(_FILES)}")
    images, labels = _load_raw(split, data_dir)
    return to_model_range(images, size), torch.from_numpy(labels.astype(np.int64))
