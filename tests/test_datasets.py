"""Fashion-MNIST from idx files: parsing, scaling, padding and where it is looked for."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import modiff.datasets as datasets
import modiff.utils.paths as paths
from modiff.datasets import SYSTEM_DIR, fashion_mnist, read_idx

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_bytes(array: np.ndarray) -> bytes:
    """The MNIST idx format: magic 0x0000 08 ndim (uint8), big-endian dims, then the data."""
    return struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _images(n: int, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 255, 0
    return images


def write_split(folder: Path, split: str, n: int = 5, gz: bool = True, seed: int = 0, names: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write synthetic idx image/label files of one split into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = _images(n, seed), np.arange(n, dtype=np.uint8) % 10
    for stem, array in zip(names or FILES[split], (images, labels)):
        data = _idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


@pytest.fixture
def no_default_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Point the system and repository folders at empty dirs, clear MODIFF_DATA_DIR, disable download."""
    system, repo = tmp_path / "system-empty", tmp_path / "repo-empty"
    monkeypatch.setattr(datasets, "SYSTEM_DIR", system)
    monkeypatch.setattr(paths, "data_dir", lambda: repo)
    monkeypatch.delenv("MODIFF_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "_download", lambda split: None)
    return [system, repo / "fashion-mnist"]


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_fashion_mnist_from_idx(tmp_path: Path, no_default_dirs, gz: bool) -> None:
    """(N, 1, 32, 32) float32 in [-1, 1]: 255 -> 1, 0 -> -1, 2-pixel border of -1; labels int64."""
    images, labels = write_split(tmp_path / "fm", "test", gz=gz)
    x, y = fashion_mnist("test", data_dir=tmp_path / "fm")
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 2, 2] == 1.0 and x[0, 0, 2, 3] == -1.0  # pixels (0, 0) = 255 and (0, 1) = 0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1.0).all()
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(images).float() / 127.5 - 1)


def test_alternative_file_names(tmp_path: Path, no_default_dirs) -> None:
    """Files named train-images.idx3-ubyte (dot before idx) are found too."""
    write_split(tmp_path / "fm", "train", names=("train-images.idx3-ubyte", "train-labels.idx1-ubyte"), gz=False)
    assert fashion_mnist("train", data_dir=tmp_path / "fm")[0].shape == (5, 1, 32, 32)


def test_search_order_and_env_var(tmp_path: Path, no_default_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """MODIFF_DATA_DIR is honoured; an explicit data_dir wins over it."""
    write_split(tmp_path / "env", "train", n=3)
    write_split(tmp_path / "explicit", "train", n=4)
    monkeypatch.setenv("MODIFF_DATA_DIR", str(tmp_path / "env"))
    assert len(fashion_mnist("train")[0]) == 3
    assert len(fashion_mnist("train", data_dir=tmp_path / "explicit")[0]) == 4
    # a folder without the files is skipped, the next place is used
    assert len(fashion_mnist("train", data_dir=tmp_path / "nothing-here")[0]) == 3


def test_missing_dataset_lists_every_place(tmp_path: Path, no_default_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """FileNotFoundError names each folder searched, the apt package, MODIFF_DATA_DIR and `modiff train --data-dir`."""
    monkeypatch.setenv("MODIFF_DATA_DIR", str(tmp_path / "env-empty"))
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist("train", data_dir=tmp_path / "given-empty")
    message = str(err.value)
    for place in [tmp_path / "given-empty", tmp_path / "env-empty", *no_default_dirs]:
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "set MODIFF_DATA_DIR=FOLDER" in message and "`modiff train` also takes --data-dir" in message
    assert "train-images-idx3-ubyte" in message


def test_only_one_split_present(tmp_path: Path, no_default_dirs) -> None:
    """Test files do not satisfy a request for the train split."""
    write_split(tmp_path / "fm", "test")
    with pytest.raises(FileNotFoundError):
        fashion_mnist("train", data_dir=tmp_path / "fm")


def test_bad_idx_files(tmp_path: Path, no_default_dirs) -> None:
    """Bad magic, truncated data and an unknown split raise ValueError."""
    bad = tmp_path / "bad"
    write_split(bad, "train", gz=False)
    path = bad / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(ValueError, match="bad magic"):
        fashion_mnist("train", data_dir=bad)
    short = tmp_path / "short.idx"
    short.write_bytes(_idx_bytes(_images(2))[:-10])
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)
    short.write_bytes(_idx_bytes(_images(2))[:9])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    with pytest.raises(ValueError, match="allowed: train, test"):
        fashion_mnist("validation")  # type: ignore[arg-type]


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    """read_idx returns the array that was written, for gz and plain, 1-D and 3-D."""
    images, labels = write_split(tmp_path, "test", n=3, gz=True)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), labels)


@pytest.mark.skipif(not (SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists() and not (SYSTEM_DIR / "train-images-idx3-ubyte").exists(),
                    reason=f"the Debian package dataset-fashion-mnist is not installed ({SYSTEM_DIR})")
def test_real_fashion_mnist() -> None:
    """The installed train set is (60000, 1, 32, 32) in [-1, 1] with 6000 images per class."""
    x, y = fashion_mnist("train", data_dir=SYSTEM_DIR)
    assert x.shape == (60000, 1, 32, 32) and y.shape == (60000,)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert (x[:, :, :2] == -1).all() and (x[:, :, -2:] == -1).all()
