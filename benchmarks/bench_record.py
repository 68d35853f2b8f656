"""Cost of recording streaming statistics during sampling, side by side with plain sampling in one process.

    python benchmarks/bench_record.py --device cuda --batch 256            # -> results/record_h200.json on an H200
    python benchmarks/bench_record.py --device cpu --batch 2 --steps 4 --repeats 3 --engines reference

Every Conv/Linear input of the UNet (random weights; speed does not depend on them), at every step, raw
and temporal differences. Variants: no recording ("none"), `Stats` only, and the default reducers (stats,
per-channel absmax, histogram, quantiles, outliers), each with every engine of `--engines` ("reference":
the torch path, "fused": the kernels of `modiff.record.engines.fused.engine`, whose count pass runs in CUDA C with
shared-memory histograms, "fused/triton-count": the same with the count pass in Triton; on the CPU the
fused path runs in the Triton interpreter only, far too slow to time). Each recorded run ends with `stats_frame()`, so the
copy of the results to the host is part of the time. After one warm-up run of every variant, the variants
are timed in turn `--repeats` times (interleaved, so a slower machine phase hits all of them) and the
fastest run of each is reported with its ratio to "none". Target (issue 5): at most 1.5x the plain
sampling time on one GPU at batch 256, 100 steps.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from modiff.diffusion.sampling import sample_ddim
from modiff.diffusion.schedules import linear_schedule, timesteps
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser
from modiff.record import Reducer, Stats, record
from modiff.record.engines.fused import engine as fused
from modiff.record.reducers import default_reducers

from profiling import kernel_table, write_profiles

ARCHS = {
    "cifar10": DDIMUNetConfig(ch=128, in_channels=3, out_ch=3),
    "fmnist-ddim": DDIMUNetConfig(ch=64, in_channels=1, out_ch=1),
}
REDUCERS: dict[str, Callable[[], list[Reducer]]] = {"stats": lambda: [Stats()], "default": default_reducers}
ENGINES = {"reference": ("reference", "shared"), "fused": ("fused", "shared"), "fused/triton-count": ("fused", "triton")}
Variant = Optional[tuple[Callable[[], list[Reducer]], str]]  # (reducers, engine of ENGINES); None: no recording
RESULTS = Path(__file__).parent / "results"


def _sample(model: torch.nn.Module, x_T: torch.Tensor, steps: int, variant: Variant) -> tuple[int, float]:
    """One sampling run (recorded unless `variant` is None); the number of statistics rows and the seconds
    of `stats_frame` (the results' copy to the host and their conversion, after the device has finished)."""
    if variant is not None:
        fused.COUNT_BACKEND = ENGINES[variant[1]][1]
    context = nullcontext() if variant is None else record(model, reducers=variant[0](), engine=ENGINES[variant[1]][0])
    with context as rec:
        sample_ddim(model, x_T, timesteps(steps), callback=None if rec is None else rec.on_step)
    if rec is None:
        return 0, 0.0
    if x_T.is_cuda:
        torch.cuda.synchronize(x_T.device)
    start = time.perf_counter()
    rows = len(rec.stats_frame())  # the results reach the host: the full cost counts
    return rows, time.perf_counter() - start


def _timed(device: torch.device, run: Callable[[], tuple[int, float]]) -> tuple[float, tuple[int, float]]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    rows = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, rows


def _device_tag(device: torch.device) -> str:
    """'h200', 'h100', ... from the GPU name; 'cpu' on the CPU."""
    if device.type != "cuda":
        return device.type
    words = torch.cuda.get_device_name(device).lower().replace("nvidia", "").split()
    return words[0] if words else "gpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="cifar10", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (the fastest is kept)")
    parser.add_argument("--variants", default=",".join(REDUCERS), help=f"comma-separated, from {list(REDUCERS)}")
    parser.add_argument("--engines", default="reference,fused", help=f"comma-separated, from {list(ENGINES)}")
    parser.add_argument("--out", help="JSON file (default: benchmarks/results/record_<device>.json)")
    parser.add_argument("--profile", help="also write a kernel table of one run of each variant (--profile-steps steps)")
    parser.add_argument("--profile-steps", type=int, default=5)
    args = parser.parse_args()
    reducers = [v for v in args.variants.split(",") if v and v != "none"]
    engines = [e for e in args.engines.split(",") if e]
    unknown = [v for v in reducers if v not in REDUCERS] + [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown variants or engines {unknown}; choose from {list(REDUCERS)} and {list(ENGINES)}")
    variants: dict[str, Variant] = {"none": None}
    variants.update({f"{r}/{e}": (REDUCERS[r], e) for r in reducers for e in engines})
    names = list(variants)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Denoiser(DDIMUNet(ARCHS[args.arch]), linear_schedule(), args.arch, {}).to(device).eval()
    x_T = torch.randn(args.batch, *model.sample_shape, device=device)
    for name in names:  # warm-up: kernels loaded, allocator primed
        _sample(model, x_T, min(args.steps, 3), variants[name])
    best: dict[str, tuple[float, int, float]] = {}
    for _ in range(args.repeats):
        for name in names:
            seconds, (n_rows, results_seconds) = _timed(device, lambda: _sample(model, x_T, args.steps, variants[name]))
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, n_rows, results_seconds)
    rows = [{"variant": name, "seconds": round(best[name][0], 3), "stat_rows": best[name][1],
             "stats_frame_seconds": round(best[name][2], 3), "ratio_to_none": round(best[name][0] / best["none"][0], 3)}
            for name in names]
    for row in rows:
        print(json.dumps(row), flush=True)
    out = Path(args.out) if args.out else RESULTS / f"record_{_device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "arch": args.arch, "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    if device.type == "cuda":
        summary["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    if args.profile:
        write_profiles({name: kernel_table(lambda: _sample(model, x_T, args.profile_steps, variants[name]), device)
                        for name in names}, args.profile)


if __name__ == "__main__":
    main()
