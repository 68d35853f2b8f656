"""Image conversion and the background PNG writer (`modiff.utils.images`)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modiff.utils.images import ImagesToHost, PngWriter, encode_png, save_png, to_uint8


def test_to_uint8_rounds_as_save_image() -> None:
    """(x + 1) * 127.5 + 0.5, clamped and truncated: -1 -> 0, 1 -> 255, 0 -> 128, NaN-free saturation."""
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.998, 1.0, 3.0]).view(1, 1, 2, 4)
    expected = np.array([0, 0, 0, 128, 191, 255, 255, 255], dtype=np.uint8).reshape(1, 2, 4, 1)
    np.testing.assert_array_equal(to_uint8(x), expected)
    rgb = to_uint8(torch.rand(2, 3, 4, 5) * 2 - 1)
    assert rgb.shape == (2, 4, 5, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\)"):
        to_uint8(torch.zeros(3, 4, 5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_images_to_host_equals_to_uint8_and_flags_non_finite_samples(device: str) -> None:
    """The copy without waiting gives to_uint8's bytes and, per sample, whether all of x was finite, also
    when more work is queued on the device after it (the next batch) and x is changed by it."""
    x = torch.rand(3, 1, 4, 5, device=device) * 2 - 1
    x[1, 0, 2, 3] = float("inf")
    expected = to_uint8(x)
    copy = ImagesToHost(x)
    for _ in range(20):
        x.mul_(-1.0001)
    images, finite = copy.result()
    np.testing.assert_array_equal(images, expected)
    assert finite == [True, False, True] and images.flags.writeable


def test_save_png_round_trips_with_the_umask_mode(tmp_path: Path) -> None:
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    save_png(image, tmp_path / "sub" / "a.png")  # the folder is made
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sub" / "a.png")), image)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "sub" / "a.png").stat().st_mode & 0o777 == 0o666 & ~mask
    assert encode_png(image[..., :1]) == encode_png(image[..., :1].copy())  # grey images as mode "L"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # no temporary file left


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
