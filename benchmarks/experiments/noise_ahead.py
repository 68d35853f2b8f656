"""Each batch's initial noise drawn ahead on a background thread, against drawn in place, side by side in one process.

    TMPDIR=/dev/shm PYTHONPATH=.:benchmarks python benchmarks/experiments/noise_ahead.py --batch-size 4096 --batches 4

Why: on the H200 host the per-seed draws of a batch's x_T took about 0.1 s per 4,096 seeds on the host, inside the
batch's sampling call, with the device waiting (`bench_user_timeline.py`, sitting 32). `generate` now draws the next
batch's noise while the current one samples (`modiff.utils.rng.first_draws_ahead`). Without a GPU, a network that
sleeps ``--network-ms`` per call stands in for a host waiting on a busy device (a sleep, like a wait on the device,
releases the GIL). "in place" replaces `first_draws_ahead` with draws made when each batch asks for them. Printed
(JSON): the seconds of each `generate` call, interleaved, and their medians.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

import modiff.pipelines.generate as generate_module
from modiff.diffusion.schedules import linear_schedule
from modiff.models.registry import Denoiser
from modiff.pipelines.generate import SampleConfig, generate
from modiff.utils.rng import FirstDraw


class SleepingNetwork(nn.Module):
    """eps = 0.5 x at 32x32, one channel, after ``seconds`` of sleep: a device that keeps the host waiting."""

    sample_shape = (1, 32, 32)

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return 0.5 * x


@contextlib.contextmanager
def drawn_in_place(batches: Sequence[Sequence[int]], shape: Sequence[int]) -> Iterator[Iterator[FirstDraw]]:
    yield (FirstDraw.of(batch, shape) for batch in batches)


def run_seconds(model: Denoiser, seeds: range, batch_size: int, steps: int, folder: Path) -> float:
    start = time.perf_counter()
    generate(model, seeds, folder, SampleConfig(steps=steps), batch_size=batch_size, device="cpu", progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--network-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = Denoiser(SleepingNetwork(args.network_ms / 1e3), linear_schedule(), "sleeping", {})
    ahead = generate_module.first_draws_ahead
    seconds: dict[str, list[float]] = {"ahead": [], "in place": []}
    with tempfile.TemporaryDirectory(prefix="noise-ahead-") as work:
        run_seconds(model, range(args.batch_size), args.batch_size, args.steps, Path(work) / "warmup")
        for round_ in range(args.rounds):
            for variant, draws in (("ahead", ahead), ("in place", drawn_in_place)):
                generate_module.first_draws_ahead = draws
                seeds = range(10**6 * (round_ + 1), 10**6 * (round_ + 1) + args.batch_size * args.batches)
                seconds[variant].append(round(run_seconds(model, seeds, args.batch_size, args.steps,
                                                          Path(work) / f"{variant}-{round_}"), 4))
    generate_module.first_draws_ahead = ahead
    print(json.dumps({"folder": tempfile.gettempdir(), "batch_size": args.batch_size, "batches": args.batches,
                      "steps": args.steps, "network_ms": args.network_ms,
                      "seconds": {k: {"median": round(statistics.median(v), 4), "runs": v} for k, v in seconds.items()}},
                     indent=1))


if __name__ == "__main__":
    main()
