"""One batch's per-seed noise: `SeedStreams.randn` (each seed's rows filled in place) against the earlier way (a
tensor per seed, then one stack), interleaved in one process.

    PYTHONPATH=. python benchmarks/experiments/seed_draws.py --batch-sizes 1024,4096

Why: the draws run on the host, one CPU generator per seed: a batch's initial noise, and with DDPM or DDIM at
eta > 0 every step's noise, which the device waits for. Both ways give the same values (tested in
tests/utils/test_rng.py). One thread, as in sitting 33 (`bench_seed_draws.py` compares thread counts). Printed
(JSON): milliseconds per batch, the median of the rounds, per batch size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from modiff.utils.rng import SeedStreams

SHAPE = (1, 32, 32)


def stacked(streams: SeedStreams) -> torch.Tensor:
    """The draws as `SeedStreams.randn` made them until sitting 33."""
    return torch.stack([torch.randn(SHAPE, generator=g, dtype=torch.float32) for g in streams._generators])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    result = {}
    for batch in map(int, args.batch_sizes.split(",")):
        times: dict[str, list[float]] = {"stacked": [], "in place": []}
        for round_ in range(args.rounds):
            for name, draw in (("stacked", stacked), ("in place", lambda s: s.randn(SHAPE))):
                streams = SeedStreams(range(round_ * batch, (round_ + 1) * batch), threads=1)
                start = time.perf_counter()
                draw(streams)
                times[name].append((time.perf_counter() - start) * 1e3)
        result[batch] = {name: round(statistics.median(t), 2) for name, t in times.items()}
    print(json.dumps({"torch_threads": torch.get_num_threads(), "rounds": args.rounds, "ms_per_batch": result}, indent=1))


if __name__ == "__main__":
    main()
