"""Images per second of full-precision DDIM sampling, measured side by side in one process.

    python benchmarks/bench_sampling.py --device cuda --out benchmarks/results/sampling_gpu.json
    python benchmarks/bench_sampling.py --device cpu --batch-sizes 8 --steps 5

Architectures: the CIFAR-10 DDIM UNet (random weights; speed does not depend on them) and fmnist-ddim.
Variants: eager fp32 (the published path), and bf16 autocast with channels_last + cudnn.benchmark,
with and without torch.compile. Each measurement runs the real `sample_ddim` loop, after one warm-up run.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from modiff.diffusion.sampling import sample_ddim
from modiff.diffusion.schedules import linear_schedule, timesteps
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser

ARCHS = {
    "cifar10": DDIMUNetConfig(ch=128, in_channels=3, out_ch=3),
    "fmnist-ddim": DDIMUNetConfig(ch=64, in_channels=1, out_ch=1),
}
VARIANTS = {
    "fp32-eager": dict(bf16=False, fast=False, compile=False),
    "bf16-channels_last": dict(bf16=True, fast=True, compile=False),
    "bf16-compiled": dict(bf16=True, fast=True, compile=True),
    "bf16-weights-compiled": dict(bf16=True, fast=True, compile=True, cast=True),
}


class _CastInput(torch.nn.Module):
    """Runs a bf16-weight network on float32 samples (the sampler keeps x in float32)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.to(torch.bfloat16)
        self.sample_shape = net.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.bfloat16), t)


def _model(arch: str, device: torch.device, opts: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Denoiser(DDIMUNet(ARCHS[arch]), linear_schedule(), arch, {}).to(device).eval()
    if opts["fast"]:
        model = model.to(memory_format=torch.channels_last)
    if opts.get("cast"):
        model.net = _CastInput(model.net)
    if opts["compile"]:
        model.net = torch.compile(model.net, dynamic=False)
    return model


def _time(model: torch.nn.Module, batch: int, steps: int, device: torch.device, bf16: bool, fast: bool) -> float:
    x_T = torch.randn(batch, *model.sample_shape, device=device)
    if fast:
        x_T = x_T.contiguous(memory_format=torch.channels_last)
    ts = timesteps(steps, "uniform")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        sample_ddim(model, x_T, ts)  # warm-up (compilation, cudnn autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample_ddim(model, x_T, ts)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", default="cifar10,fmnist-ddim")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-sizes", default="64,512")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    rows = []
    for arch in args.archs.split(","):
        for variant in args.variants.split(","):
            opts = VARIANTS[variant]
            if device.type == "cpu" and opts["compile"]:
                continue
            model = _model(arch, device, opts)
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                seconds = _time(model, batch, args.steps, device, opts["bf16"] and not opts.get("cast"), opts["fast"])
                row = {"arch": arch, "variant": variant, "batch": batch, "steps": args.steps,
                       "seconds": round(seconds, 3), "images_per_s": round(batch / seconds, 4),
                       "images_per_s_at_100_steps": round(batch / seconds * args.steps / 100, 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
