"""Where a PNG file's time goes on a file system: the system calls of an atomic write against plainer ones.

    PYTHONPATH=. python benchmarks/experiments/png_file_system_sitting31.py /tmp /dev/shm > png_file_system.json

Sitting 31 asked whether `save_png` (encode, a temporary name, rename) could write the user path's last batch
faster with fewer directory operations. Five rounds of 2,048 files per folder, the variants interleaved within
each round, so that a file system slowing down as its dirty data grows shows as a trend over the rounds for
every variant alike. Printed: milliseconds per file, the median and each round in order. Linux only (O_TMPFILE).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from modiff.utils.images import encode_png, save_png

FILES, ROUNDS = 2048, 5
IMAGE = np.random.default_rng(0).integers(0, 255, (32, 32, 1), dtype=np.uint8)


def _write(name: str, data: bytes, folder_fd: int, flags: int = os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(name, os.O_WRONLY | flags, 0o666, dir_fd=folder_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def as_modiff(folder: Path, folder_fd: int, i: int) -> None:
    save_png(IMAGE, folder / f"{i:06d}.png")


def renamed(folder: Path, folder_fd: int, i: int) -> None:
    name = f"{i:06d}.png"
    _write(f".{name}.tmp", encode_png(IMAGE), folder_fd)
    os.replace(f".{name}.tmp", name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)


def linked_unnamed(folder: Path, folder_fd: int, i: int) -> None:
    fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666)
    try:
        os.write(fd, encode_png(IMAGE))
        # linkat(AT_SYMLINK_FOLLOW) of the magic link: a dir fd makes os.link call linkat, not link(2)
        os.link(f"/proc/self/fd/{fd}", f"{i:06d}.png", src_dir_fd=folder_fd, dst_dir_fd=folder_fd, follow_symlinks=True)
    finally:
        os.close(fd)


def direct(folder: Path, folder_fd: int, i: int) -> None:
    _write(f"{i:06d}.png", encode_png(IMAGE), folder_fd)


def encode_only(folder: Path, folder_fd: int, i: int) -> None:
    encode_png(IMAGE)


VARIANTS: dict[str, Callable[[Path, int, int], None]] = {
    "save_png": as_modiff, "rename": renamed, "tmpfile": linked_unnamed, "direct": direct, "encode": encode_only}


def ms_per_file(write: Callable[[Path, int, int], None], base: str) -> float:
    with tempfile.TemporaryDirectory(dir=base) as name:
        folder, folder_fd = Path(name), os.open(name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            start = time.perf_counter()
            for i in range(FILES):
                write(folder, folder_fd, i)
            return (time.perf_counter() - start) / FILES * 1e3
        finally:
            os.close(folder_fd)


def main(bases: list[str]) -> None:
    rounds: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        for base in bases:
            for variant, write in VARIANTS.items():
                rounds.setdefault(f"{base} {variant}", []).append(ms_per_file(write, base))
    table = {key: [round(statistics.median(ms), 4), [round(m, 3) for m in ms]] for key, ms in rounds.items()}
    print(json.dumps({"ms_per_file_median_and_runs": table, "files": FILES}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or [tempfile.gettempdir()])
