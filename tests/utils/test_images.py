"""Image conversion and the background PNG writer (`modiff.utils.images`)."""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import modiff.utils.device as device_module
from modiff.utils.device import host_threads
from modiff.utils.images import PngWriter, encode_png, encode_pngs, save_png, to_uint8
from modiff.utils.runs import write_bytes_atomic


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


def test_encode_pngs_equals_one_image_at_a_time() -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    assert encode_pngs(images) == [encode_png(image) for image in images]
    with pytest.raises(ValueError, match=r"expected \(N, H, W, C\) uint8 with C in \(1, 3\), got uint8 of shape \(6, 7, 3\)"):
        encode_pngs(images[0])


def _recording_writer(threads: list[str], written: list[str], fail_at: str = "") -> Callable[[Path, bytes], None]:
    def write(path: Path, data: bytes) -> None:
        threads.append(threading.current_thread().name)
        if path.name == fail_at:
            raise OSError("disk full")
        written.append(path.name)
        write_bytes_atomic(path, data)
    return write


def test_writer_writes_small_submissions_in_order_on_one_thread(tmp_path: Path) -> None:
    threads: list[str] = []
    written: list[str] = []
    images = [np.full((2, 2, 1), i, dtype=np.uint8) for i in range(6)]
    with PngWriter(_recording_writer(threads, written), max_pending=1, threads=4, min_part=2) as writer:
        for start in (0, 2, 4):  # below 2 * min_part: not split
            writer.submit(images[start:start + 2], [tmp_path / f"{i}.png" for i in range(start, start + 2)])
        writer.submit([], [])
    assert [int(np.asarray(Image.open(tmp_path / f"{i}.png"))[0, 0]) for i in range(6)] == list(range(6))
    assert written == [f"{i}.png" for i in range(6)] and set(threads) == {"modiff-png_0"}


def test_writer_splits_a_large_submission_over_its_threads(tmp_path: Path) -> None:
    """11 files with min_part 3 over 4 threads: 3 contiguous parts (11 // 3), each on its own thread, every
    file the PNG of its image. Each part's first write waits until all three parts have started, so they run at
    once: otherwise a helper that finished its part early could take the next one too (ThreadPoolExecutor reuses
    an idle thread), as happened once in CI. Were two parts ever queued on one thread, the barrier would break."""
    threads: list[str] = []
    written: list[str] = []
    started = threading.Barrier(3, timeout=30)
    record = _recording_writer(threads, written)

    def write(path: Path, data: bytes) -> None:
        if threading.current_thread().name not in threads:
            started.wait()
        record(path, data)

    images = np.arange(11, dtype=np.uint8).reshape(11, 1, 1, 1).repeat(3, axis=1)
    with PngWriter(write, threads=4, min_part=3) as writer:
        writer.submit(images, [tmp_path / f"{i:02d}.png" for i in range(11)])
    assert sorted(written) == [f"{i:02d}.png" for i in range(11)]
    assert [int(np.asarray(Image.open(tmp_path / f"{i:02d}.png"))[2, 0]) for i in range(11)] == list(range(11))
    parts = [[name for name, thread in zip(written, threads) if thread == t] for t in dict.fromkeys(threads)]
    assert sorted(map(len, parts)) == [3, 4, 4] and all(part == sorted(part) for part in parts)
    assert sorted(p[0] for p in parts) == ["00.png", "03.png", "07.png"]  # contiguous: 0-2, 3-6, 7-10


def test_writer_stops_at_the_first_error_and_raises_it(tmp_path: Path) -> None:
    threads: list[str] = []
    written: list[str] = []
    image = np.zeros((2, 2, 1), dtype=np.uint8)
    with pytest.raises(OSError, match="disk full"):
        with PngWriter(_recording_writer(threads, written, fail_at="2.png")) as writer:
            writer.submit([image] * 3, [tmp_path / f"{i}.png" for i in range(3)])
            writer.submit([image] * 2, [tmp_path / f"{i}.png" for i in range(3, 5)])
    assert written == ["0.png", "1.png"]  # nothing after the failed file, as if the process had stopped


def test_writer_parts_start_no_file_after_an_error(tmp_path: Path) -> None:
    """The second of two parts fails at its first file. The first part, if it had started its first file (held
    there until the writer has seen the error), finishes that file and starts no other; the error is raised once
    both parts are done."""
    written: list[str] = []

    def write(path: Path, data: bytes) -> None:
        if path.name == "2.png":
            raise OSError("disk full")
        assert writer._failed.wait(5)
        written.append(path.name)

    writer = PngWriter(write, threads=2, min_part=2)
    with pytest.raises(OSError, match="disk full"):
        with writer:
            writer.submit(np.zeros((4, 2, 2, 1), np.uint8), [tmp_path / f"{i}.png" for i in range(4)])
    assert written in ([], ["0.png"])


def test_writer_finishes_queued_files_when_the_caller_fails(tmp_path: Path) -> None:
    image = np.zeros((2, 2, 1), dtype=np.uint8)
    with pytest.raises(KeyError):
        with PngWriter() as writer:
            writer.submit([image] * 2, [tmp_path / "a.png", tmp_path / "b.png"])
            raise KeyError("sampling failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("usable, expected", [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_writer_threads_follow_the_usable_cpus_up_to_four(usable: int, expected: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    with PngWriter() as writer:
        assert host_threads() == expected and writer.threads == expected


def test_writer_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        PngWriter(max_pending=0)
    with pytest.raises(ValueError, match="threads and min_part must be >= 1, got 0 and 128"):
        PngWriter(threads=0)
    with PngWriter() as writer, pytest.raises(ValueError, match="2 images for 1 paths"):
        writer.submit([np.zeros((1, 1, 1), np.uint8)] * 2, [tmp_path / "a.png"])
