"""Cost of recording streaming statistics during sampling, side by side with plain sampling.

    python benchmarks/bench_record.py --device cuda --batch 256 --out benchmarks/results/record_gpu.json
    python benchmarks/bench_record.py --device cpu --arch fmnist-ddim --batch 2 --steps 4

Every Conv/Linear input of the UNet (random weights), every step, raw and temporal differences. Variants:
no recording, `Stats` only, and the default reducers (stats, per-channel absmax, histogram, quantiles,
outliers). Target (issue 5): at most 1.5x the plain sampling time on one GPU at batch 256.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from modiff.diffusion.sampling import sample_ddim
from modiff.diffusion.schedules import linear_schedule, timesteps
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser
from modiff.record import Stats, record
from modiff.record.reducers import default_reducers

ARCHS = {
    "cifar10": DDIMUNetConfig(ch=128, in_channels=3, out_ch=3),
    "fmnist-ddim": DDIMUNetConfig(ch=64, in_channels=1, out_ch=1),
}
VARIANTS = {"none": None, "stats": lambda: [Stats()], "default": default_reducers}


def _sample(model: torch.nn.Module, x_T: torch.Tensor, steps: int, reducers) -> None:
    context = nullcontext() if reducers is None else record(model, reducers=reducers())
    with context as rec:
        sample_ddim(model, x_T, timesteps(steps), callback=None if rec is None else rec.on_step)
        if rec is not None:
            rec.stats_frame()  # the results reach the host: the full cost is counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="cifar10", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Denoiser(DDIMUNet(ARCHS[args.arch]), linear_schedule(), args.arch, {}).to(device).eval()
    x_T = torch.randn(args.batch, *model.sample_shape, device=device)
    rows = []
    for name, reducers in VARIANTS.items():
        _sample(model, x_T, min(args.steps, 3), reducers)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _sample(model, x_T, args.steps, reducers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"variant": name, "seconds": round(time.perf_counter() - start, 3)})
        rows[-1]["ratio_to_none"] = round(rows[-1]["seconds"] / rows[0]["seconds"], 3)
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "arch": args.arch, "batch": args.batch, "steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
