"""Image conversion and the background PNG writer (`modiff.utils.images`)."""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modiff.utils.images import PngWriter, encode_png, save_png, to_uint8


def test_to_uint8_rounds_as_save_image() -> None:
    """(x + 1) * 127.5 + 0.5, clamped and truncated: -1 -> 0, 1 -> 255, 0 -> 128, NaN-free saturation."""
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.998, 1.0, 3.0]).view(1, 1, 2, 4)
    expected = np.array([0, 0, 0, 128, 191, 255, 255, 255], dtype=np.uint8).reshape(1, 2, 4, 1)
    np.testing.assert_array_equal(to_uint8(x), expected)
    rgb = to_uint8(torch.rand(2, 3, 4, 5) * 2 - 1)
    assert rgb.shape == (2, 4, 5, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\)"):
        to_uint8(torch.zeros(3, 4, 5))


def test_save_png_round_trips_with_the_umask_mode(tmp_path: Path) -> None:
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    save_png(image, tmp_path / "sub" / "a.png")  # the folder is made
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "a.png")), image)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "sub" / "a.png").stat().st_mode & 0o777 == 0o666 & ~mask
    assert encode_png(image[..., :1]) == encode_png(image[..., :1].copy())  # grey images as mode "L"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # no temporary file left


@pytest.mark.parametrize("shape", [(32, 32, 1), (7, 5, 3), (1, 1, 1), (342, 342, 3)])
def test_encode_png_decodes_to_the_image(shape: tuple[int, int, int]) -> None:
    """PIL reads the bytes back to the same pixels, as mode L (one channel) or RGB, and its checks of the
    chunks' CRCs pass."""
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(image)
    Image.open(io.BytesIO(data)).verify()
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == ("L" if shape[-1] == 1 else "RGB") and decoded.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(decoded).reshape(shape), image)


@pytest.mark.parametrize("image", [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 1), np.float32),
                                   np.zeros((4, 4), np.uint8)])
def test_encode_png_refuses_what_it_cannot_write(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"expected \(H, W, C\) uint8 with C in \(1, 3\)"):
        encode_png(image)


def test_writer_writes_in_order_on_another_thread(tmp_path: Path) -> None:
    threads: list[str] = []

    def save(image: np.ndarray, path: Path) -> None:
        threads.append(threading.current_thread().name)
        save_png(image, path)

    images = [np.full((2, 2, 1), i, dtype=np.uint8) for i in range(6)]
    with PngWriter(save, max_pending=1) as writer:
        for start in (0, 2, 4):
            writer.submit(images[start:start + 2], [tmp_path / f"{i}.png" for i in range(start, start + 2)])
        writer.submit([], [])
    assert [int(np.asarray(Image.open(tmp_path / f"{i}.png"))[0, 0]) for i in range(6)] == list(range(6))
    assert len(threads) == 6 and all(name.startswith("modiff-png") for name in threads)


def test_writer_stops_at_the_first_error_and_raises_it(tmp_path: Path) -> None:
    written: list[str] = []

    def save(image: np.ndarray, path: Path) -> None:
        if path.name == "2.png":
            raise OSError("disk full")
        written.append(path.name)

    image = np.zeros((2, 2, 1), dtype=np.uint8)
    with pytest.raises(OSError, match="disk full"):
        with PngWriter(save) as writer:
            writer.submit([image] * 3, [tmp_path / f"{i}.png" for i in range(3)])
            writer.submit([image] * 2, [tmp_path / f"{i}.png" for i in range(3, 5)])
    assert written == ["0.png", "1.png"]  # nothing after the failed file, as if the process had stopped


def test_writer_finishes_queued_files_when_the_caller_fails(tmp_path: Path) -> None:
    image = np.zeros((2, 2, 1), dtype=np.uint8)
    with pytest.raises(KeyError):
        with PngWriter() as writer:
            writer.submit([image] * 2, [tmp_path / "a.png", tmp_path / "b.png"])
            raise KeyError("sampling failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_writer_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        PngWriter(max_pending=0)
    with PngWriter() as writer, pytest.raises(ValueError, match="2 images for 1 paths"):
        writer.submit([np.zeros((1, 1, 1), np.uint8)] * 2, [tmp_path / "a.png"])
