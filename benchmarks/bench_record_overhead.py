"""Host-side cost of recording one site call: microseconds and PyTorch operators per call, per reducer.

    python benchmarks/bench_record_overhead.py --out benchmarks/results/record_overhead_cpu.json
    python benchmarks/bench_record_overhead.py --device cuda --out benchmarks/results/record_overhead_h200.json

A chain of 1x1 convolutions on tiny tensors (batch 2, 8 channels, 4x4), so the arithmetic is negligible
and what is left is the work of dispatching operators, which a GPU pays as kernel launches: on an H200 at
batch 256 the CIFAR-10 UNet's 36 ms step has room for about 160 us per site call within the 1.5x target
of issue 5 (113 sites). Each variant records raw values and temporal differences at every step.
On CUDA the kernel launches per call are counted too. The CPU takes other code paths than CUDA in two
places (two-pass moments, arithmetic bin counting), so compare devices by their own numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from modiff.record import ChannelAbsMax, Histogram, Outliers, Quantiles, Reducer, Stats, record
from modiff.record.reducers import default_reducers

VARIANTS: dict[str, Callable[[], list[Reducer]]] = {
    "buffers only": lambda: [], "Stats": lambda: [Stats()], "ChannelAbsMax": lambda: [ChannelAbsMax()],
    "Histogram(256)": lambda: [Histogram(256)], "Quantiles(1024)": lambda: [Quantiles()],
    "Outliers(3, 6)": lambda: [Outliers()], "default": default_reducers,
}
SITES, STEPS = 50, 20


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(SITES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Step:
    def __init__(self, index: int) -> None:
        self.index, self.t = index, 1000 - index


@torch.no_grad()
def _record(model: nn.Module, x: torch.Tensor, reducers: Callable[[], list[Reducer]], steps: int) -> float:
    with record(model, reducers=reducers()) as rec:
        _sync(x)
        start = time.perf_counter()
        for i in range(steps):
            model(x)
            rec.on_step(_Step(i))
        _sync(x)
        return time.perf_counter() - start


def _counts_per_call(model: nn.Module, x: torch.Tensor, reducers: Callable[[], list[Reducer]]) -> dict[str, float]:
    """aten operators (views included) and, on CUDA, kernel launches per site call, beyond the plain forward."""
    def counts(run: Callable[[], object]) -> tuple[int, int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = prof.key_averages()
        return (sum(e.count for e in events if e.key.startswith("aten::")),
                sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")))

    ops, launches = counts(lambda: _record(model, x, reducers, 4))
    plain_ops, plain_launches = counts(lambda: _plain(model, x, 4))
    out = {"operators_per_site_call": round((ops - plain_ops) / (SITES * 4), 1)}
    if x.is_cuda:
        out["kernel_launches_per_site_call"] = round((launches - plain_launches) / (SITES * 4), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    model, x = _Chain().eval().to(device), torch.randn(2, 8, 4, 4, device=device)
    _plain(model, x, 3)
    plain = min(_plain(model, x, STEPS) for _ in range(args.repeats))
    rows = []
    for name, reducers in VARIANTS.items():
        _record(model, x, reducers, 3)
        seconds = min(_record(model, x, reducers, STEPS) for _ in range(args.repeats))
        row = {"variant": name, "us_per_site_call": round((seconds - plain) / (SITES * STEPS) * 1e6, 1),
               **_counts_per_call(model, x, reducers)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "sites": SITES, "steps": STEPS, "rows": rows}, f, indent=1)


@torch.no_grad()
def _plain(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    _sync(x)
    start = time.perf_counter()
    for _ in range(steps):
        model(x)
    _sync(x)
    return time.perf_counter() - start


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


if __name__ == "__main__":
    main()
