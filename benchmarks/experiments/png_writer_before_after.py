"""The PNG writer of this checkout against that of another, side by side in one process.

    git worktree add /tmp/before a99b064
    TMPDIR=/dev/shm PYTHONPATH=.:benchmarks python benchmarks/experiments/png_writer_before_after.py /tmp/before --threads 1,2,4

Separate processes of `bench_png_writer.py` differ by more than the writers do on the development VM (a
process's files all land while its page cache and the disk's backlog are in one state), so this loads the other
checkout's `modiff.utils.runs` and `modiff.utils.images` under other names and interleaves the two writers, one
batch of Fashion-MNIST PNGs each, round after round. Printed (JSON): milliseconds per file, the median over the
rounds and each round, for the other checkout's writer with its default threads and this one's per thread count.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from bench_png_writer import test_images
from modiff.utils import images as this_images


def load_writer(checkout: Path) -> ModuleType:
    """``checkout``'s `modiff.utils.images`, importing its own `modiff.utils.runs` (both under other names)."""
    def load(name: str, path: Path, source: str) -> ModuleType:
        spec = importlib.util.spec_from_loader(name, loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        exec(compile(source, str(path), "exec"), module.__dict__)
        return module

    runs = checkout / "modiff/utils/runs.py"
    load("before_runs", runs, runs.read_text())
    images = checkout / "modiff/utils/images.py"
    return load("before_images", images, images.read_text().replace("from modiff.utils.runs import",
                                                                     "from before_runs import"))


def ms_per_file(writer: type, images: np.ndarray, **options: int) -> float:
    with tempfile.TemporaryDirectory(prefix="png-before-after-") as folder:
        paths = [Path(folder) / f"{i:06d}.png" for i in range(len(images))]
        start = time.perf_counter()
        with writer(**options) as pngs:
            pngs.submit(list(images), paths)
        return (time.perf_counter() - start) / len(images) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    before = load_writer(args.before)
    images = test_images(args.images)
    variants = {"before": lambda: ms_per_file(before.PngWriter, images)}
    for threads in map(int, args.threads.split(",")):
        variants[f"threads={threads}"] = lambda t=threads: ms_per_file(this_images.PngWriter, images, threads=t)
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            rounds[name].append(round(run(), 4))
    print(json.dumps({"folder": tempfile.gettempdir(), "images": args.images, "rounds": args.rounds,
                      "ms_per_file": {name: {"median": round(statistics.median(times), 4), "rounds": times}
                                      for name, times in rounds.items()}}, indent=1))


if __name__ == "__main__":
    main()
