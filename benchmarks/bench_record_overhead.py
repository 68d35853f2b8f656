"""Host-side cost of recording one site call: microseconds and PyTorch operators per call, per reducer.

    python benchmarks/bench_record_overhead.py --out benchmarks/results/record_overhead_cpu.json
    python benchmarks/bench_record_overhead.py --device cuda --out benchmarks/results/record_overhead_h200.json
    TRITON_INTERPRET=1 python benchmarks/bench_record_overhead.py --engines reference,fused --repeats 1   # CPU, operators only

A chain of 1x1 convolutions on tiny tensors (batch 2, 8 channels, 4x4), so the arithmetic is negligible
and what is left is the work of dispatching operators, which a GPU pays as kernel launches: on an H200 at
batch 256 the CIFAR-10 UNet's 36 ms step has room for about 160 us per site call within the 1.5x target
of issue 5 (113 sites). Each variant records raw values and temporal differences at every step.
Every variant runs on each engine of --engines ("reference": the torch path, "fused": the Triton kernels
of `modiff.record.engines.fused.engine`, whose launches are not aten operators). On CUDA the device kernels per call are
counted too (Triton's included). On the CPU the fused path needs the Triton interpreter, whose time means
nothing; its operator count does. The CPU takes other code paths than CUDA in two
places (two-pass moments, arithmetic bin counting), so compare devices by their own numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

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
def _record(model: nn.Module, x: torch.Tensor, reducers: Callable[[], list[Reducer]], steps: int, engine: str) -> float:
    with record(model, reducers=reducers(), engine=engine) as rec:
        _sync(x)
        start = time.perf_counter()
        for i in range(steps):
            model(x)
            rec.on_step(_Step(i))
        _sync(x)
        return time.perf_counter() - start


class _Labelled:
    """A Triton kernel whose launches show in the profiler as "triton::<name>" (what they run is not counted)."""

    def __init__(self, name: str, kernel: Any) -> None:
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            with record_function(f"triton::{self.name}"):
                self.kernel[grid](*args, **kwargs)
        return launch


def _label_triton_launches() -> None:
    from modiff.record.engines.fused import triton_kernels as kernels
    for name in ("scan_kernel", "summary_kernel", "count_kernel", "add_counts_kernel"):
        setattr(kernels, name, _Labelled(name, getattr(kernels, name)))


def _inside_triton(event: Any) -> bool:
    while event is not None:
        if event.name.startswith("triton::"):
            return True
        event = event.cpu_parent
    return False


def _counts_per_call(model: nn.Module, x: torch.Tensor, reducers: Callable[[], list[Reducer]], engine: str) -> dict[str, float]:
    """aten operators (views included, those inside Triton launches not: the interpreter's copies), Triton
    launches and, on CUDA, device kernels per site call, beyond the plain forward."""
    def counts(run: Callable[[], object]) -> tuple[int, int, int]:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
        with profile(activities=activities) as prof:
            run()
        events = prof.events()
        return (sum(e.name.startswith("aten::") and not _inside_triton(e) for e in events),
                sum(e.name.startswith("triton::") and e.device_type == DeviceType.CPU for e in events),  # not its CUDA range
                sum(e.device_type == DeviceType.CUDA for e in events))

    ops, triton_launches, kernels = counts(lambda: _record(model, x, reducers, 4, engine))
    plain_ops, _, plain_kernels = counts(lambda: _plain(model, x, 4))
    calls = SITES * 4
    out = {"operators_per_site_call": round((ops - plain_ops) / calls, 1),
           "triton_launches_per_site_call": round(triton_launches / calls, 1)}
    if x.is_cuda:
        out["device_kernels_per_site_call"] = round((kernels - plain_kernels) / calls, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", help="comma-separated: reference, fused (default: both on CUDA, reference on the CPU)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    model, x = _Chain().eval().to(device), torch.randn(2, 8, 4, 4, device=device)
    _plain(model, x, 3)
    plain = min(_plain(model, x, STEPS) for _ in range(args.repeats))
    engines = (args.engines or ("reference,fused" if device.type == "cuda" else "reference")).split(",")
    if "fused" in engines:
        _label_triton_launches()
    rows = []
    for name, reducers in VARIANTS.items():
        for engine in engines:
            _record(model, x, reducers, 3, engine)
            seconds = min(_record(model, x, reducers, STEPS, engine) for _ in range(args.repeats))
            row = {"variant": name, "engine": engine,
                   "us_per_site_call": round((seconds - plain) / (SITES * STEPS) * 1e6, 1),
                   **_counts_per_call(model, x, reducers, engine)}
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
