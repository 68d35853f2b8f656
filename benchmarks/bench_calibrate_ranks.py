"""Wall time of `modiff calibrate-shipped` on 1 and on N torchrun ranks sharing one device, side by side in one job.

    python3 benchmarks/bench_calibrate_ranks.py --model fmnist-ldm --device cuda:0 --ranks 1,5 --preset 'qdiff-w8a*' \\
        --set adaround.iters=500 --set activations.iters=100 --out benchmarks/results/calibrate_ranks_gpu.json
    python3 benchmarks/bench_calibrate_ranks.py --model data/train/mine --device cpu --ranks 1,2 --samples-per-step 4 \\
        --calib-steps 2 --set adaround.iters=3 --set activations.iters=2 --out /tmp/calibrate_ranks_cpu.json  # smoke run

Every rank count calibrates its own copy of the model folder without its shipped calibration, so each does the same
work (calibration data, AdaRound once per weight bit width, every preset's step sizes), and each count runs under
torchrun (one rank too) with the same OMP_NUM_THREADS per rank (1 unless set: torchrun's default for several
ranks, and on the CPU the sums depend on the thread count). The copies' weight codes and step sizes (every
``.safetensors`` file) are compared with the first count's: on the CPU they must be byte-identical, on a GPU the
JSON says whether they are. Each count's calibration prints its progress as it goes, and ``--out`` is rewritten
after every count, so a job stopped during a later count keeps the counts it finished.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from modiff.models.registry import load_model
from modiff.quant.ptq.shipped import CALIBRATION_DIR
from modiff.utils.runs import environment, write_json


def model_copy(model: str, into: Path) -> Path:
    """The model folder of ``model`` (a name or a folder) copied to ``into`` without its calibration."""
    folder = Path(load_model(model).folder)
    shutil.copytree(folder, into, ignore=shutil.ignore_patterns(CALIBRATION_DIR))
    return into


def calibration_digests(folder: Path) -> dict[str, str]:
    """sha256 of every weight-code and step-size file of ``folder``'s calibration, by path inside it."""
    root = folder / CALIBRATION_DIR
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors")) if "calib-data" not in p.parts}


def timed_calibration(folder: Path, ranks: int, options: list[str]) -> float:
    """Seconds of ``torchrun --nproc-per-node ranks -m modiff calibrate-shipped --model folder ...``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "modiff",
               "calibrate-shipped", "--model", str(folder), *options]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    done = subprocess.run(command, env=env)  # its progress streams through, as a user would see it
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed (exit {done.returncode}); their output is above")
    return seconds


def compare_ranks(model: str, rank_counts: list[int], options: list[str], work: Path) -> Iterator[dict]:
    """One row per rank count, yielded as each finishes: its wall seconds, the speedup over the first count, and
    whether its files equal the first count's."""
    first = None
    for ranks in rank_counts:
        folder = model_copy(model, work / f"ranks{ranks}")
        seconds = timed_calibration(folder, ranks, options)
        digests = calibration_digests(folder)
        first = first or (seconds, digests)
        row = {"ranks": ranks, "seconds": round(seconds, 2), "speedup": round(first[0] / seconds, 3),
               "files": len(digests), "identical_to_first": digests == first[1]}
        print(f"{ranks} ranks: {seconds:.1f} s ({row['speedup']}x), files identical: {row['identical_to_first']}")
        yield row


def _rank_counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--ranks takes rank counts >= 1, separated by commas; got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-ldm")
    parser.add_argument("--device", default="cuda:0", help="every rank's device (cuda:0: all share one GPU)")
    parser.add_argument("--ranks", type=_rank_counts, default=[1, 4], help="rank counts, comma-separated")
    parser.add_argument("--preset", action="append", default=None, help="as calibrate-shipped's (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="as calibrate-shipped's (repeatable)")
    parser.add_argument("--samples-per-step", type=int, default=256)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the environment as JSON")
    args = parser.parse_args()
    options = [*(a for p in (args.preset or ["qdiff-w8a*"]) for a in ("--preset", p)), "--device", args.device,
               "--samples-per-step", str(args.samples_per_step), "--calib-steps", str(args.calib_steps),
               *(a for s in args.set for a in ("--set", s))]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="calibrate_ranks_") as work:
        for row in compare_ranks(args.model, args.ranks, options, Path(work)):
            rows.append(row)
            if args.out:
                write_json({"model": args.model, "calibrate_shipped": options, "rows": rows,
                            "rank_counts": args.ranks, "environment": environment(args.device)}, args.out)


if __name__ == "__main__":
    main()
