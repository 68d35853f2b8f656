"""Image conversion, grids and PNG files (numpy and zlib: the library never imports matplotlib)."""
from __future__ import annotations

import math
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from modiff.utils.device import host_threads
from modiff.utils.runs import disk_full_hint, write_bytes_atomic

__all__ = ["to_uint8", "make_grid", "encode_pngs", "encode_png", "save_png", "PngWriter"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding as torchvision's save_image does. Computed
    on x's device (the same float32 operations, so the same bytes), then one copy of a quarter the size."""
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    scaled = ((x.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (H', W', C) uint8 mosaic, nrow images per row."""
    b, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type: greyscale, truecolour


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _check_pixels(array: np.ndarray, layout: str) -> None:
    """Raise unless ``array`` is uint8 laid out as ``layout`` ("(H, W, C)", ...) with 1 or 3 channels."""
    if array.dtype != np.uint8 or array.ndim != layout.count(",") + 1 or array.shape[-1] not in _PNG_COLOR_TYPE:
        raise ValueError(f"expected {layout} uint8 with C in (1, 3), got {array.dtype} of shape {array.shape}")


def encode_pngs(images: np.ndarray) -> list[bytes]:
    """(N, H, W, C) uint8 with C in {1, 3} as the bytes of N PNG files: 8-bit greyscale or RGB, each row
    unfiltered, one zlib stream. Three chunks, written here rather than through PIL, whose per-file Python work
    dominates for images this small; the rows of all N are laid out at once and the header and end chunks are
    shared, so what is left per file is zlib's work, which runs without the GIL (`PngWriter` spreads it over
    threads). A run's last batch of PNGs is written after the device is done, so it counts (benchmarks/README.md,
    "The PNG encoder")."""
    _check_pixels(images, "(N, H, W, C)")
    count, height, width, channels = images.shape
    rows = np.zeros((count, height, 1 + width * channels), dtype=np.uint8)  # each row: filter type 0, its bytes
    rows[:, :, 1:] = images.reshape(count, height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    head, end = _PNG_SIGNATURE + _png_chunk(b"IHDR", header), _png_chunk(b"IEND", b"")
    return [head + _png_chunk(b"IDAT", zlib.compress(image_rows)) + end for image_rows in rows]


def encode_png(image: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as `encode_pngs` writes it."""
    _check_pixels(image, "(H, W, C)")
    return encode_pngs(image[None])[0]


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write (H, W, C) uint8 with C in {1, 3} atomically (temporary name, then rename)."""
    path = Path(path)
    with disk_full_hint(path.parent, f"{path.name} was not written, files written before are kept"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, encode_png(image))


class PngWriter:
    """Writes PNGs on background threads while the caller goes on (sampling the next batch).

    `submit(images, paths)` queues a batch of files and returns at once; it waits only while more than
    ``max_pending`` submissions are unfinished, and raises the error of a finished one. Submissions are written
    one after another; a large one (at least ``2 * min_part`` files) is split into contiguous parts written at
    once by up to ``threads`` threads, as zlib and the file system's calls release the GIL, so that the last
    batch, written after sampling ends, takes a fraction of one thread's time. After an error no thread starts
    another file, as if the process had stopped there (a full disk, Ctrl-C). Leaving the ``with`` block waits
    for every queued file, also when the block failed, and then raises the first error of a write.
    ``write(path, data)`` writes one file's bytes (`write_bytes_atomic`: atomically).
    """

    def __init__(self, write: Optional[Callable[[Path, bytes], None]] = None, max_pending: int = 4,
                 threads: Optional[int] = None, min_part: int = 128):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        threads = host_threads() if threads is None else threads
        if threads < 1 or min_part < 1:
            raise ValueError(f"threads and min_part must be >= 1, got {threads} and {min_part}")
        self.write, self.max_pending, self.threads, self.min_part = write or write_bytes_atomic, max_pending, threads, min_part
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="modiff-png")
        self._helpers = ThreadPoolExecutor(threads - 1, thread_name_prefix="modiff-png-part") if threads > 1 else None
        self._pending: deque[Future] = deque()
        self._failed = threading.Event()

    def __enter__(self) -> "PngWriter":
        return self

    def _write_part(self, images: np.ndarray, paths: Sequence[Path]) -> None:
        for data, path in zip(encode_pngs(images), paths):
            if self._failed.is_set():
                return
            try:
                self.write(path, data)
            except BaseException:
                self._failed.set()
                raise

    def _write(self, images: Sequence[np.ndarray] | np.ndarray, paths: Sequence[Path]) -> None:
        """One submission: its first part on this thread, the others on the helpers; returns once all are done."""
        images = images if isinstance(images, np.ndarray) else np.stack(images)
        parts = min(self.threads, len(paths) // self.min_part) or 1
        bounds = [len(paths) * i // parts for i in range(parts + 1)]
        helpers = [self._helpers.submit(self._write_part, images[a:b], paths[a:b])
                   for a, b in zip(bounds[1:-1], bounds[2:])] if self._helpers else []
        try:
            self._write_part(images[: bounds[1]], paths[: bounds[1]])
        finally:
            for helper in helpers:
                helper.exception()  # wait for every part before raising this one's error
        for helper in helpers:
            helper.result()

    def submit(self, images: Sequence[np.ndarray] | np.ndarray, paths: Sequence[Path]) -> None:
        if len(images) != len(paths):
            raise ValueError(f"{len(images)} images for {len(paths)} paths")
        self._collect(lambda future: future.done() or len(self._pending) > self.max_pending)
        if len(paths):
            self._pending.append(self._pool.submit(self._write, images, list(paths)))

    def _collect(self, ready: Callable[[Future], bool]) -> None:
        """Take finished (or, while too many are queued, the oldest) submissions off the queue; raise their errors."""
        while self._pending and ready(self._pending[0]):
            self._pending.popleft().result()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self._pool.shutdown(wait=True)
        if self._helpers:
            self._helpers.shutdown(wait=True)
        if kind is None:
            self._collect(lambda future: True)
