"""Image conversion, grids and PNG files (numpy and zlib: the library never imports matplotlib)."""
from __future__ import annotations

import math
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from modiff.utils.runs import disk_full_hint, write_bytes_atomic

__all__ = ["to_uint8", "make_grid", "encode_png", "save_png", "PngWriter"]


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


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C in {1, 3} as the bytes of a PNG file: 8-bit greyscale or RGB, each row unfiltered,
    one zlib stream. Three chunks, written here rather than through PIL, whose per-file Python work dominates
    for images this small; a run's last batch of PNGs is written after the device is done, so it counts
    (benchmarks/README.md, "The PNG encoder")."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in _PNG_COLOR_TYPE:
        raise ValueError(f"expected (H, W, C) uint8 with C in (1, 3), got {image.dtype} of shape {image.shape}")
    height, width, channels = image.shape
    rows = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # each row: filter type 0, then its bytes
    rows[:, 1:] = image.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows.tobytes()))
            + _png_chunk(b"IEND", b""))


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write (H, W, C) uint8 with C in {1, 3} atomically (temporary name, then rename)."""
    path = Path(path)
    with disk_full_hint(path.parent, f"{path.name} was not written, files written before are kept"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, encode_png(image))


class PngWriter:
    """Writes PNGs on a background thread, in order, while the caller goes on (sampling the next batch).

    `submit(images, paths)` queues the files and returns at once; it waits only while more than
    ``max_pending`` submissions are unfinished, and raises the error of a finished one. After an error the
    thread writes nothing more, as if the process had stopped there (a full disk, Ctrl-C). Leaving the
    ``with`` block waits for every queued file, also when the block failed, and then raises the first error
    of a write. ``save(image, path)`` writes one file (`save_png`: atomically). One thread keeps pace with
    sampling (a small PNG takes a fraction of a millisecond) and keeps the files in submission order.
    """

    def __init__(self, save: Callable[[np.ndarray, Path], None] = save_png, max_pending: int = 4):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.save, self.max_pending = save, max_pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="modiff-png")
        self._pending: deque[Future] = deque()
        self._failed = threading.Event()

    def __enter__(self) -> "PngWriter":
        return self

    def _write(self, images: Sequence[np.ndarray], paths: Sequence[Path]) -> None:
        for image, path in zip(images, paths):
            if self._failed.is_set():
                return
            try:
                self.save(image, path)
            except BaseException:
                self._failed.set()
                raise

    def submit(self, images: Sequence[np.ndarray], paths: Sequence[Path]) -> None:
        if len(images) != len(paths):
            raise ValueError(f"{len(images)} images for {len(paths)} paths")
        self._collect(lambda future: future.done() or len(self._pending) > self.max_pending)
        self._pending.append(self._pool.submit(self._write, list(images), list(paths)))

    def _collect(self, ready: Callable[[Future], bool]) -> None:
        """Take finished (or, while too many are queued, the oldest) submissions off the queue; raise their errors."""
        while self._pending and ready(self._pending[0]):
            self._pending.popleft().result()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self._pool.shutdown(wait=True)
        if kind is None:
            self._collect(lambda future: True)
