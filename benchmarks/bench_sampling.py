"""Images per second of sampling: the user path beside the network alone, in one process.

    python benchmarks/bench_sampling.py --device cuda --out benchmarks/results/sampling_paths_h200.json
    python benchmarks/bench_sampling.py --device cuda --presets fp --variants fast --batch-sizes 1024 --profile
    python benchmarks/bench_sampling.py --device cuda --variants fast --inductor conv_1x1_as_mm=true
    python benchmarks/bench_sampling.py --device cpu --model cifar10 --variants fp32 --batch-sizes 4 --steps 3

Paths (``--paths``):
  network  the sampling loop alone (`modiff.pipelines.generate.sample` in a MoDiff trajectory: per-seed
           noise, the sampler, the network), nothing written; the median of ``--repeats`` trajectories.
  user     what `modiff sample` runs: `generate` into a new run folder (PNGs on the writer thread, grid,
           samples.npz, manifest) for ``--batches`` batches, wrapping the network anew as each call does.
Both run after a warm-up in the same process, so compilation is not in these numbers (bench_compile.py
measures it); the user path still records its CUDA graphs, as every `modiff sample` does.

Variants (``--variants``), the execution settings of `modiff.pipelines.execution`:
  fast            bf16 autocast, channels_last, torch.compile, CUDA graphs (the default on CUDA)
  fast-no-graphs  the same without CUDA graphs
  bf16-eager      bf16 autocast, channels_last, eager
  fp32            IEEE float32, eager (the CPU default, and the GPU default before the fast path)

``--model``: a model preset (fmnist-ddim, fmnist-ldm; real weights) or cifar10 (the CIFAR-10 DDIM UNet with
random weights). ``--inductor key=value`` patches torch._inductor.config for the whole run (the compiled
variants of both paths). ``--profile`` prints, per preset and variant, the top kernels by device time of one
trajectory of ``--profile-steps`` steps (default ``--steps``) at the largest batch. ``--host-profile ROWS``
keeps the host's profile of each timed user-path call (cProfile, its top ROWS functions by cumulative time).
"""
from __future__ import annotations

import argparse
import ast
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import modiff as md
from modiff.pipelines.execution import ExecutionConfig, prepared_network
from modiff.pipelines.generate import SampleConfig, generate, sample
from modiff.quant import presets, quantize, trajectory

from bench_models import benchmark_model
from profiling import kernel_table

VARIANTS = {
    "fast": ExecutionConfig(precision="bf16", compile=True, cuda_graphs=True),
    "fast-no-graphs": ExecutionConfig(precision="bf16", compile=True, cuda_graphs=False),
    "bf16-eager": ExecutionConfig(precision="bf16"),
    "fp32": ExecutionConfig(precision="fp32"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _network_seconds(model: torch.nn.Module, batch: int, config: SampleConfig, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    with trajectory(model):
        sample(model, range(batch), config, device)
    _sync(device)
    return time.perf_counter() - start


def _network(model: torch.nn.Module, execution: ExecutionConfig, batch: int, config: SampleConfig,
             device: torch.device, repeats: int) -> float:
    """Images per second of the sampling loop, the network wrapped once (warm-up, then ``repeats`` runs)."""
    with prepared_network(model, device, execution) as runner:
        _network_seconds(runner, batch, config, device)
        seconds = statistics.median(_network_seconds(runner, batch, config, device) for _ in range(repeats))
    return batch / seconds


def _user(model: torch.nn.Module, execution: ExecutionConfig, batch: int, batches: int, config: SampleConfig,
          device: torch.device, work: Path, host_rows: int = 0) -> tuple[float, str]:
    """Images per second of `generate` (a warm-up call of one batch first, into another folder) and, with
    ``host_rows``, the host's profile of the timed call: its functions by cumulative time (waits on the device
    included), which says where the user path spends what the network path does not."""
    def run(seeds: range, name: str, profiler: cProfile.Profile | None = None) -> float:
        with tempfile.TemporaryDirectory(dir=work, prefix=f"bench-{name}-") as folder:
            start = time.perf_counter()
            with profiler or nullcontext():
                generate(model, seeds, Path(folder) / "run", config, batch_size=batch, device=str(device),
                         prepare=trajectory, compile=execution.compile, cuda_graphs=execution.cuda_graphs,
                         progress=False)
            return time.perf_counter() - start

    run(range(batch), "warmup")
    images, profiler = batch * batches, cProfile.Profile() if host_rows else None
    seconds = run(range(10**6, 10**6 + images), "timed", profiler)
    if profiler is None:
        return images / seconds, ""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(host_rows)
    return images / seconds, text.getvalue()


def _profile(model: torch.nn.Module, execution: ExecutionConfig, batch: int, config: SampleConfig,
             device: torch.device, rows: int) -> str:
    with prepared_network(model, device, execution) as runner:
        _network_seconds(runner, batch, config, device)  # warm-up: graphs are recorded before profiling
        return kernel_table(lambda: _network_seconds(runner, batch, config, device), device, rows)


def _parse_inductor(items: list[str]) -> dict[str, Any]:
    """``key=value`` items as torch._inductor.config patches (true/false, numbers and literals parsed)."""
    patches: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--inductor takes key=value, got {item!r}")
        if raw.lower() in ("true", "false"):
            patches[key] = raw.lower() == "true"
            continue
        try:
            patches[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            patches[key] = raw
    return patches


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ("preset", "variant", "batch", "network_img_s", "user_img_s", "user_over_network")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).rjust(widths[c]) for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="fmnist-ddim")
    parser.add_argument("--presets", default="fp,w8a4-modiff")
    parser.add_argument("--variants", default="fast,fp32")
    parser.add_argument("--paths", default="network,user")
    parser.add_argument("--batch-sizes", default="256,512,1024,2048")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="timed trajectories of the network path (median)")
    parser.add_argument("--batches", type=int, default=4, help="batches of the timed user-path run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where run folders go")
    parser.add_argument("--inductor", action="append", default=[], help="torch._inductor.config key=value")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of each preset and variant")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="steps of the profiled trajectory (default: --steps; fewer over-weight MoDiff's warm-up)")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--host-profile", type=int, default=0, metavar="ROWS",
                        help="profile the timed user-path call on the host (cProfile) and keep its top ROWS functions")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    variants, paths = args.variants.split(","), args.paths.split(",")
    bad = [v for v in variants if v not in VARIANTS] + [p for p in paths if p not in ("network", "user")]
    bad += [p for p in args.presets.split(",") if p != "fp" and p not in presets]
    if bad:
        parser.error(f"unknown variants, paths or presets: {bad}")
    if args.host_profile < 0:
        parser.error(f"--host-profile takes a number of rows >= 0, got {args.host_profile}")
    if device.type != "cuda" and any(VARIANTS[v].cuda_graphs for v in variants):
        parser.error("CUDA graphs (variant fast) need --device cuda")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    base = benchmark_model(args.model)
    rows, profiles = [], {}
    with ExitStack() as stack:
        if args.inductor:
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(_parse_inductor(args.inductor)))
        for preset in args.presets.split(","):
            model = base if preset == "fp" else quantize(base, presets[preset])
            for variant in variants:
                execution = VARIANTS[variant]
                config = SampleConfig(steps=args.steps, spacing=md.default_spacing(base), precision=execution.precision)
                for batch in batch_sizes:
                    row: dict[str, Any] = {"model": args.model, "preset": preset, "variant": variant, "batch": batch,
                                           "steps": args.steps}
                    if "network" in paths:
                        row["network_img_s"] = round(_network(model, execution, batch, config, device, args.repeats), 1)
                    if "user" in paths:
                        user_img_s, host = _user(model, execution, batch, args.batches, config, device, args.work,
                                                 args.host_profile)
                        row["user_img_s"] = round(user_img_s, 1)
                        if host:
                            profiles[f"{preset} {variant} batch {batch} user path, host"] = host
                            print(host, flush=True)
                    if "network_img_s" in row and "user_img_s" in row:
                        row["user_over_network"] = round(row["user_img_s"] / row["network_img_s"], 3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if args.profile:  # printed at once, so a run stopped by a time limit keeps its tables
                    name = f"{preset} {variant} batch {batch_sizes[-1]}"
                    steps = args.profile_steps or args.steps
                    profiles[name] = _profile(model, execution, batch_sizes[-1], replace(config, steps=steps), device,
                                              args.profile_rows)
                    print(f"\n=== {name}: top kernels over {steps} steps ===\n{profiles[name]}", flush=True)
    _print_table(rows)
    if args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "inductor": args.inductor, "rows": rows,
                       "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
