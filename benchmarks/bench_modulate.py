"""MoDiff's modulation step alone: the two kernels against the one-pass kernel, per layer shape, in one process.

    python benchmarks/bench_modulate.py --device cuda --batch 4096 --out benchmarks/results/modulate_h100.json
    python benchmarks/bench_modulate.py --device cpu --batch 2 --shapes 4x8x8 --repeats 2   # smoke run (interpreter)

Why: the one-pass kernel (`modiff.quant.kernels.modulate.one_pass_modulation`) is meant to read a_t and a_hat from
HBM once, its second read coming from L2, where the two kernels read them twice. End to end
(`bench_user_timeline.py --one-pass-modulation`) the step is one part of a network; here it is timed alone, so the
question has a direct answer: with bf16 a_t and a_hat, the two kernels move at least 5 passes of 2 bytes per value
(ranges: read a_t, a_hat; update: read both, write a_hat) and the one-pass kernel 3 where its second read hits L2,
so it should take about 3/5 of their time if both run at one bandwidth. Printed per shape: median ms per call of
each, their ratio, and each one's bandwidth over its counted passes (one-pass counted at 3). The shapes default to
`fmnist-ddim`'s largest layer inputs (channels x height x width, channels_last bf16, W8A4 MoDiff's 4-bit
per-sample asymmetric quantizer with error compensation). Interleaved rounds, CUDA events on CUDA. On the CPU the
kernels run in the Triton interpreter (TRITON_INTERPRET=1, set here before Triton is imported): a smoke run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

DEFAULT_SHAPES = "64x32x32,128x32x32,192x32x32,128x16x16,256x8x8"
PASSES = {"two kernels": 5, "one pass": 3}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a shape is CxHxW with positive integers, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Milliseconds of one call of a function, on the device's clock where there is one."""
    def cuda_ms(call: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def host_ms(call: Callable[[], None]) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3

    return cuda_ms if device.type == "cuda" else host_ms


def measure(device: torch.device, batch: int, shapes: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    from modiff.quant import presets
    from modiff.quant.kernels.modulate import launch_modulate, one_pass_modulation
    from modiff.quant.primitives import quant_grid

    spec = presets["w8a4-modiff"].activation.spec
    grid = tuple(t.to(device) for t in quant_grid(spec))
    timer = _timer(device)
    rows = []
    for channels, height, width in shapes:
        gen = torch.Generator(device).manual_seed(0)
        shape = (batch, channels, height, width)
        x = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16, memory_format=torch.channels_last)
        a_hat = (x + (0.1 * torch.randn(shape, generator=gen, device=device)).to(torch.bfloat16)).contiguous(
            memory_format=torch.channels_last)
        times: dict[str, list[float]] = {name: [] for name in PASSES}
        for round_ in range(repeats + 1):  # the first round compiles
            for name in PASSES:
                with one_pass_modulation(name == "one pass"):
                    ms = timer(lambda: launch_modulate(x, a_hat, None, spec, None, grid))
                if round_:
                    times[name].append(ms)
        median = {name: statistics.median(values) for name, values in times.items()}
        row = {"shape": [batch, channels, height, width], "values": x.numel(),
               **{f"{name} ms": round(ms, 4) for name, ms in median.items()},
               "one pass / two kernels": round(median["one pass"] / median["two kernels"], 3),
               **{f"{name} GB/s over {passes} passes": round(passes * 2 * x.numel() / (median[name] * 1e6), 1)
                  for name, passes in PASSES.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated CxHxW layer inputs")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as err:
        parser.error(str(err))
    if min(args.batch, args.repeats) < 1:
        parser.error("--batch and --repeats must be >= 1")
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; --device cpu runs the kernels in the Triton interpreter")
    from modiff.utils.runs import environment, write_json

    result = {"environment": environment(device), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "batch": args.batch, "repeats": args.repeats, "rows": measure(device, args.batch, shapes,
                                                                                         args.repeats)}
    if args.out:
        write_json(result, Path(args.out))


if __name__ == "__main__":
    main()
