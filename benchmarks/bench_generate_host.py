"""The host's share of `modiff sample`: `generate` around a network that costs nothing, under cProfile.

    python benchmarks/bench_generate_host.py --seeds 16384 --batch-size 4096 --out benchmarks/results/generate_host_cpu.json

Why: on the GPU the user path (`bench_sampling.py --paths user`) adds to the network's time whatever the host
does between batches and around the run (the folder's bookkeeping, the copy to uint8, queueing PNGs) and the last
batch's PNG writes. With a network that returns 0.5 x, the sampling loop is nearly free and what is left is that
host work, measurable on any machine. Printed: the run's seconds, and the cumulative seconds of the functions
that hold the device idle (opening the run folder, each batch's bookkeeping, closing the run) beside the PNG
writer's wait at the end (the tail, here every file, as sampling takes no time). Any machine; CPU.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from modiff.diffusion.schedules import linear_schedule
from modiff.models.registry import Denoiser
from modiff.pipelines.generate import SampleConfig, generate

FUNCTIONS = {  # (file suffix, function name) -> what it holds up
    ("pipelines/generate.py", "_open_run"): "open the run (before the first batch)",
    ("pipelines/generate.py", "_write_batch"): "each batch's bookkeeping (between batches)",
    ("pipelines/generate.py", "sample"): "sampling loop with initial noise",
    ("pipelines/generate.py", "_close_run"): "close the run (grid, samples.npz, manifest)",
    ("utils/images.py", "__exit__"): "wait for the PNG writer",
}


class FreeNetwork(nn.Module):
    """eps = 0.5 x at 32x32, one channel: a denoiser whose forward costs next to nothing."""

    sample_shape = (1, 32, 32)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


def profile_run(seeds: int, batch_size: int, steps: int, folder: Path) -> dict[str, float]:
    model = Denoiser(FreeNetwork(), linear_schedule(), "free", {})
    config = SampleConfig(steps=steps)
    generate(model, range(batch_size), folder / "warmup", config, batch_size=batch_size, device="cpu", progress=False)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    with profiler:
        generate(model, range(10**6, 10**6 + seeds), folder / "timed", config, batch_size=batch_size, device="cpu",
                 progress=False)
    seconds = {"run": time.perf_counter() - start, **{label: 0.0 for label in FUNCTIONS.values()}}
    for (file, _, name), (_, _, _, cumulative, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        for (suffix, function), label in FUNCTIONS.items():
            if file.endswith(suffix) and name == function:
                seconds[label] += cumulative
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where run folders go")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if min(args.seeds, args.batch_size, args.steps) < 1:
        parser.error("--seeds, --batch-size and --steps must be >= 1")
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-generate-host-") as folder:
        seconds = profile_run(args.seeds, args.batch_size, args.steps, Path(folder))
    for label, value in seconds.items():
        print(f"{value:8.3f} s  {label}")
    if args.out:
        rounded = {label: round(value, 4) for label, value in seconds.items()}
        Path(args.out).write_text(json.dumps({"seeds": args.seeds, "batch_size": args.batch_size, "steps": args.steps,
                                              "seconds": rounded}, indent=1) + "\n")


if __name__ == "__main__":
    main()
