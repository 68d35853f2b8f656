"""Network calls of a model on several CUDA streams at once: does a batch split into sub-batches that run
concurrently keep the GPU busier than the same images in one batch?

    python benchmarks/bench_streams.py --layouts 1x1024,2x512,1x2048,2x1024 --out benchmarks/results/streams_h200.json

A layout SxB replays S CUDA graphs of the compiled network at batch B, each recorded on its own stream into its
own memory pool, one replay per stream per step, for ``--steps`` steps; images/s are those of 100-step
trajectories at the measured rate of network calls (S B images per step). The network runs as on the fast path (bf16 autocast,
channels_last, torch.compile, `modiff.pipelines.execution`); the timesteps are spread over the schedule. Step
boundaries are not synchronised across streams (the sampler's update is not in the graphs), so this is the
most the concurrency can give: what is left between kernels of one batch (launch gaps, the last wave of each
kernel, small kernels that do not fill the GPU) that a second batch's kernels could fill.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modiff.pipelines.execution import CompiledNet

from bench_models import benchmark_model

TRAJECTORY_STEPS = 100  # images/s are those of 100-step trajectories, as in bench_sampling.py


def parse_layout(text: str) -> tuple[int, int]:
    """"2x512" -> (2 streams, batch 512)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise ValueError(f"a layout is STREAMSxBATCH, two integers >= 1 as in 2x512; got {text!r}")
    return int(parts[0]), int(parts[1])


class _StreamGraph:
    """One CUDA graph of ``net`` at ``batch``, recorded on its own stream into its own pool."""

    def __init__(self, net: torch.nn.Module, shape: tuple[int, ...], batch: int, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        generator = torch.Generator(device).manual_seed(batch)
        self.x = torch.randn((batch, *shape), device=device, generator=generator).contiguous(
            memory_format=torch.channels_last)
        self.t = torch.linspace(0, 999, batch, device=device).round().long()
        self.graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream), torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            for _ in range(2):  # compilation and autotuning before the capture
                net(self.x, self.t)
            torch.cuda.synchronize(device)
            with torch.cuda.graph(self.graph, stream=self.stream, pool=torch.cuda.graph_pool_handle()):
                self.out = net(self.x, self.t)

    def replay(self) -> None:
        with torch.cuda.stream(self.stream):
            self.graph.replay()


def images_per_second(graphs: list[_StreamGraph], steps: int, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        for graph in graphs:
            graph.replay()
    torch.cuda.synchronize(device)
    images = sum(graph.x.shape[0] for graph in graphs)
    return images * steps / TRAJECTORY_STEPS / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-ddim")
    parser.add_argument("--layouts", default="1x1024,2x512,1x2048,2x1024")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        layouts = [(text, *parse_layout(text)) for text in args.layouts.split(",")]
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        raise SystemExit("bench_streams.py measures CUDA streams: it needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = benchmark_model(args.model).to(device).eval().to(memory_format=torch.channels_last)
    net = CompiledNet(model.net)
    rows = []
    for layout, streams, batch in layouts:
        graphs = [_StreamGraph(net, tuple(model.sample_shape), batch, device) for _ in range(streams)]
        images_per_second(graphs, 5, device)
        rates = [images_per_second(graphs, args.steps, device) for _ in range(args.repeats)]
        rows.append({"layout": layout, "streams": streams, "batch": batch,
                     "images_per_s": statistics.median(rates), "repeats": rates})
        print(f"{layout:>8}  {statistics.median(rates):8.1f} images/s  ({', '.join(f'{r:.1f}' for r in rates)})",
              flush=True)
        del graphs
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "steps": args.steps, "device": torch.cuda.get_device_name(),
                                        "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
