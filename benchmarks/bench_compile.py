"""Compile seconds per quantization preset in one process: the first preset of a structure pays for its
graphs, later presets (other bit widths) and later steps reuse them (`modiff.pipelines.execution.CompiledNet`).

    python benchmarks/bench_compile.py --device cuda --out benchmarks/results/compile_h200.json
    python benchmarks/bench_compile.py --device cuda --arch cifar10 --batch 512
    python benchmarks/bench_compile.py --device cuda --wrapper torch-compile   # the network under plain torch.compile
    python benchmarks/bench_compile.py --device cpu --batch 2 --steps 3 --backend eager --presets w8a8,w4a4,w8a4-modiff

Every preset samples one trajectory twice on the fast path (bf16 autocast, channels_last, the compiled
network, CUDA graphs on CUDA), in the order given: the first run includes compilation and the recording
of the CUDA graphs, the second does not; compile_s = first_s - steady_s. new_graphs counts the graphs
dynamo compiled for the preset (0: every graph came from an earlier preset). Random weights: compile time
does not depend on them. `--wrapper torch-compile` compiles the network with plain torch.compile (the warm-up
step compiled too, dynamo's default recompile limit) for comparison.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch._dynamo.utils import counters

from modiff.diffusion.schedules import linear_schedule
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser
from modiff.pipelines.cuda_graphs import CUDAGraphed
from modiff.pipelines.execution import CompiledNet
from modiff.pipelines.generate import SampleConfig, sample
from modiff.quant import presets, quantize, trajectory

ARCHS = {
    "cifar10": DDIMUNetConfig(ch=128, in_channels=3, out_ch=3),
    "fmnist-ddim": DDIMUNetConfig(ch=64, in_channels=1, out_ch=1),
}
PRESETS = ("fp", "w8a8", "w4a4", "w8a4", "w8a8-modiff", "w8a4-modiff", "w4a4-modiff", "w8a4-modiff-noec",
           "published-w8a4", "published-w8a8-modiff", "published-w4a4-modiff", "cache5")


def _model(arch: str, preset: str) -> Denoiser:
    torch.manual_seed(0)
    model = Denoiser(DDIMUNet(ARCHS[arch]), linear_schedule(), arch, {}).eval()
    return model if preset == "fp" else quantize(model, presets[preset])


def _wrap(model: Denoiser, device: torch.device, args: argparse.Namespace) -> Denoiser:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.wrapper == "compiled-net":
        model.net = CompiledNet(model.net, backend=args.backend, mode=args.mode)
    else:
        model.net = torch.compile(model.net, backend=args.backend, mode=args.mode, dynamic=False)
    if device.type == "cuda" and not args.no_cuda_graphs:
        model.net = CUDAGraphed(model.net)
    return model


def _trajectory(model: Denoiser, batch: int, config: SampleConfig, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with trajectory(model):
        sample(model, range(batch), config, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _measure(preset: str, args: argparse.Namespace, device: torch.device, config: SampleConfig) -> dict[str, Any]:
    model = _wrap(_model(args.arch, preset), device, args)
    graphs = counters["stats"]["unique_graphs"]
    first = _trajectory(model, args.batch, config, device)
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    steady = _trajectory(model, args.batch, config, device)
    return {"arch": args.arch, "preset": preset, "wrapper": args.wrapper, "batch": args.batch, "steps": args.steps,
            "new_graphs": new_graphs, "first_s": round(first, 2), "steady_s": round(steady, 3),
            "compile_s": round(first - steady, 2)}


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ("preset", "new_graphs", "first_s", "steady_s", "compile_s")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).rjust(widths[c]) for c in columns))
    print(f"total compile seconds: {sum(r['compile_s'] for r in rows):.1f} over {len(rows)} presets, "
          f"{sum(r['new_graphs'] for r in rows)} graphs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="fmnist-ddim", choices=list(ARCHS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager, aot_eager: no codegen)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--wrapper", choices=("compiled-net", "torch-compile"), default="compiled-net")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    unknown = [p for p in args.presets.split(",") if p != "fp" and p not in presets]
    if unknown:
        parser.error(f"unknown presets {unknown}")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    config = SampleConfig(steps=args.steps, precision="bf16" if device.type == "cuda" else "fp32")
    rows = []
    for preset in args.presets.split(","):
        rows.append(_measure(preset, args, device, config))
        print(json.dumps(rows[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _print_table(rows)
    if args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
