"""Per-seed noise draws on 1, 2, ... threads (`SeedStreams(threads=...)`), side by side in one process.

    python benchmarks/bench_seed_draws.py --batch-sizes 512,1024,4096 --threads 1,2,4 --out benchmarks/results/seed_draws_threads_cpu.json

Why: every sample owns a CPU generator, so a batch's noise is one `normal_` call per seed on the host: the initial
noise of each batch, and with DDPM or DDIM at eta > 0 the noise of every step, drawn while the device runs that
step. Where the draws take longer than the device's step, the host sets the pace. Each round draws every
batch size once per thread count, interleaved (so drift in the machine touches each alike), from the streams'
second draw on (a step's noise, after x_T), with fresh seeds per round. Printed (JSON): per batch size and
thread count, the median milliseconds per draw and the speed-up over the first thread count. Any machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from modiff.utils.rng import SeedStreams


def draw_ms(seeds: range, shape: tuple[int, ...], threads: int) -> float:
    """Milliseconds for one step's draw of ``seeds`` (after their first), on ``threads`` threads."""
    streams = SeedStreams(seeds, threads=threads)
    streams.randn(shape)
    start = time.perf_counter()
    streams.randn(shape)
    return (time.perf_counter() - start) * 1e3


def measure(batch_sizes: list[int], thread_counts: list[int], shape: tuple[int, ...], rounds: int) -> list[dict]:
    times = {(b, t): [] for b in batch_sizes for t in thread_counts}
    for round_ in range(rounds):
        for batch in batch_sizes:
            for threads in thread_counts:
                times[batch, threads].append(draw_ms(range(round_ * batch, (round_ + 1) * batch), shape, threads))
    rows = []
    for batch in batch_sizes:
        base = statistics.median(times[batch, thread_counts[0]])
        for threads in thread_counts:
            ms = statistics.median(times[batch, threads])
            rows.append({"batch": batch, "threads": threads, "ms": round(ms, 2), "speedup": round(base / ms, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="512,1024,4096")
    parser.add_argument("--threads", default="1,2,4", help="comma-separated thread counts; the first is the base")
    parser.add_argument("--shape", default="1,32,32", help="one sample's shape (fmnist-ddim: 1,32,32)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    shape = tuple(int(n) for n in args.shape.split(","))
    if min(batch_sizes + thread_counts + list(shape)) < 1 or args.rounds < 1:
        parser.error("--batch-sizes, --threads, --shape and --rounds must all be >= 1")
    result = {"shape": list(shape), "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
              "rows": measure(batch_sizes, thread_counts, shape, args.rounds)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
