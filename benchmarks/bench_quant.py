"""Throughput and memory of quantized sampling, measured side by side in one process.

    python benchmarks/bench_quant.py --device cuda --out benchmarks/results/quant_gpu.json
    python benchmarks/bench_quant.py --device cpu --arch fmnist-ddim --batch-sizes 2 --steps 3
    python benchmarks/bench_quant.py --device cuda --variants fp,w4a4-modiff,w4a4-modiff/torch --batch-sizes 64 --repeats 3
    python benchmarks/bench_quant.py --device cuda --variants fp,w4a4-modiff --batch-sizes 64,512 --cuda-graphs

Every variant runs the CIFAR-10-size DDIM UNet (random weights) through the real `sample_ddim` loop,
100 DDIM steps, under bf16 autocast with channels_last and the network compiled (on CUDA); modulated
layers compile with the rest of the network (one graph per phase: warm-up and refresh). Reported: images per second,
peak GPU memory, the state the simulator holds per batch after a trajectory (a_hat, in the autocast
dtype), and the state a low-bit deployment of MoDiff needs (a_hat and o_hat in float32,
`modiff_state_bytes`).

A variant is a preset name; PRESET/torch runs per-sample presets with the torch modulation step compiled by
inductor instead of the kernels of `modiff.quant.kernels.modulate` (the library's choice on CUDA). `--repeats N` times N runs and reports
images per second at their median. `--cuda-graphs` replays every step after the first two of a trajectory as
one CUDA graph (`modiff.pipelines.cuda_graphs`), for every variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from modiff.pipelines.cuda_graphs import CUDAGraphed
from modiff.diffusion.sampling import sample_ddim
from modiff.diffusion.schedules import linear_schedule, timesteps
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser
from modiff.quant import presets, quantize, trajectory
from modiff.quant.kernels import modulate as fused
from modiff.quant.cost import measure_macs, modiff_state_bytes
from modiff.quant.layers.trajectory import state_bytes

from profiling import kernel_table, write_profiles

ARCHS = {
    "cifar10": DDIMUNetConfig(ch=128, in_channels=3, out_ch=3),
    "fmnist-ddim": DDIMUNetConfig(ch=64, in_channels=1, out_ch=1),
}
VARIANTS = ("fp", "w8a8", "w4a4", "w4a4-modiff", "published-w4a4-modiff")
# Whether the layers take the Triton step, per variant suffix
STEP_KERNELS = {"": True, "torch": False}


def _build(arch: str, preset: str, device: torch.device, compile_net: bool, cuda_graphs: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Denoiser(DDIMUNet(ARCHS[arch]), linear_schedule(), arch, {}).eval()
    if preset != "fp":
        model = quantize(model, presets[preset])
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile_net:
        model.net = torch.compile(model.net, dynamic=False)
    if cuda_graphs:
        model.net = CUDAGraphed(model.net)
    return model


def _deployment_state_bytes(arch: str, preset: str) -> int:
    """Per image: a_hat and o_hat of every modulated layer in float32 (0 for stateless presets)."""
    if preset == "fp" or not presets[preset].stateful:
        return 0
    model = quantize(Denoiser(DDIMUNet(ARCHS[arch]), linear_schedule(), arch, {}), presets[preset])
    x = torch.zeros(1, *model.sample_shape)
    costs, _ = measure_macs(model, x, torch.zeros(1, dtype=torch.long))
    return modiff_state_bytes(model, costs)


def _run(model: torch.nn.Module, preset: str, batch: int, steps: int, device: torch.device,
         callback: Optional[Callable] = None) -> int:
    x_T = torch.randn(batch, *model.sample_shape, device=device)
    ts = timesteps(steps, "uniform")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast, trajectory(model) as states:  # no states (and nothing done) for stateless presets
        sample_ddim(model, x_T, ts, callback=callback)
        return state_bytes(states)


def _time(model, preset, batch, steps, device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    state_size = _run(model, preset, batch, steps, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, state_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="cifar10", choices=list(ARCHS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-sizes", default="512,64")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant and batch size (median)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the steps as CUDA graphs (CUDA only)")
    parser.add_argument("--out")
    parser.add_argument("--profile", help="also write a kernel table of one run per variant and batch size "
                                          "(--profile-steps steps after a first, MoDiff's warm-up, left out; "
                                          "after the timed run)")
    parser.add_argument("--profile-steps", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    rows, profiles = [], {}
    for variant in args.variants.split(","):
        preset, _, step = variant.partition("/")
        if preset not in presets or step not in STEP_KERNELS:
            parser.error(f"unknown variant {variant!r}: PRESET or PRESET/torch")
        fused._KERNELS = STEP_KERNELS[step]  # read when the network is traced
        model = _build(args.arch, preset, device, device.type == "cuda" and not args.no_compile, args.cuda_graphs)
        deployment_bytes = _deployment_state_bytes(args.arch, preset)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            _run(model, preset, batch, args.steps, device)  # warm-up: compilation and autotuning
            timed = [_time(model, preset, batch, args.steps, device) for _ in range(args.repeats)]
            seconds, state_size = statistics.median(t for t, _ in timed), timed[0][1]
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            row = {"arch": args.arch, "preset": variant, "cuda_graphs": args.cuda_graphs, "batch": batch,
                   "steps": args.steps,
                   "seconds": round(seconds, 3), "runs": [round(t, 3) for t, _ in timed],
                   "images_per_s": round(batch / seconds, 3), "peak_gpu_gb": round(peak / 1e9, 2),
                   "modiff_state_gb": round(state_size / 1e9, 3),
                   "deployment_state_gb": round(deployment_bytes * batch / 1e9, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                profiles[f"{variant} batch {batch}"] = kernel_table(  # after MoDiff's eager warm-up step
                    lambda after_step: _run(model, preset, batch, args.profile_steps + 1, device, after_step), device,
                    skip_steps=1)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    if args.profile:
        write_profiles(profiles, args.profile)


if __name__ == "__main__":
    main()
