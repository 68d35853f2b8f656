"""The user path's tail: one batch of PNGs written by `PngWriter` on 1, 2, ... threads, side by side in one process.

    python benchmarks/bench_png_writer.py --images 2048 --threads 1,2,4 --out benchmarks/results/png_writer_cpu.json

Why: `modiff sample` writes each batch's PNGs on background threads while the GPU samples the next batch, so
only the last batch's files are written after sampling ends (`bench_user_timeline.py`); the writer splits a batch
into contiguous parts, one per thread. The images are Fashion-MNIST
test images at the models' 32x32 (what `fmnist-ddim` samples look like to the PNG encoder), written atomically
into a fresh temporary folder per trial. Printed per thread count: the median seconds from the first submit to
the last file on disk, files per second, and the speed-up over one thread; then the encoding alone, in memory
(the rest of a file's time is the file system's). Any machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from modiff.datasets import fashion_mnist
from modiff.utils.images import PngWriter, encode_pngs, to_uint8


def test_images(count: int) -> np.ndarray:
    """(count, 32, 32, 1) uint8 Fashion-MNIST test images, repeated if more are asked for than the split has."""
    images, _ = fashion_mnist("test")
    chosen = images[np.arange(count) % len(images)]
    return to_uint8(chosen)


def tail_seconds(images: np.ndarray, threads: int) -> float:
    """Seconds until every image is on disk, written by `PngWriter` as `modiff sample` runs it, on ``threads``
    threads (one submission, the whole batch)."""
    with tempfile.TemporaryDirectory(prefix="bench-png-") as folder:
        paths = [Path(folder) / f"{i:06d}.png" for i in range(len(images))]
        start = time.perf_counter()
        with PngWriter(threads=threads) as writer:
            writer.submit(images, paths)
        return time.perf_counter() - start


def encode_ms_per_file(images: np.ndarray) -> float:
    """Milliseconds to encode one image as PNG bytes in memory: the part of a file's cost that is not the file
    system's."""
    start = time.perf_counter()
    encode_pngs(images)
    return (time.perf_counter() - start) / len(images) * 1e3


def measure(images: np.ndarray, thread_counts: list[int], repeats: int) -> list[dict[str, float]]:
    """Trials interleaved over the thread counts (so drift in the machine touches each alike); medians."""
    seconds: dict[int, list[float]] = {t: [] for t in thread_counts}
    for _ in range(repeats):
        for threads in thread_counts:
            seconds[threads].append(tail_seconds(images, threads))
    base = statistics.median(seconds[thread_counts[0]])
    return [{"threads": t, "seconds": round(statistics.median(s), 4), "files_per_s": round(len(images) / statistics.median(s), 1),
             "speedup": round(base / statistics.median(s), 2)} for t, s in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--threads", default="1,2,4", help="comma-separated thread counts; the first is the base")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.images < 1 or args.repeats < 1 or min(thread_counts) < 1:
        parser.error("--images, --repeats and every --threads count must be >= 1")
    images = test_images(args.images)
    rows = measure(images, thread_counts, args.repeats)
    encode_ms = encode_ms_per_file(images)
    for row in rows:
        print(f"{row['threads']:>3} threads  {row['seconds']:.3f} s  {row['files_per_s']:>8.1f} files/s  x{row['speedup']:.2f}")
    print(f"encoding alone (no file): {encode_ms:.3f} ms per image")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "images": args.images, "repeats": args.repeats,
                                              "encode_ms_per_file": round(encode_ms, 4), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
