"""Where the user path's seconds go: one `generate` call, phase by phase, on the host's clock and the device's.

    python benchmarks/bench_user_timeline.py --device cuda --batch-size 4096 --batches 4 --out benchmarks/results/user_timeline_h200.json
    python benchmarks/bench_user_timeline.py --device cpu --batch-size 8 --batches 2 --steps 3
    python benchmarks/bench_user_timeline.py --device cuda --sampler ddpm --batch-size 4096 --batches 4
    python benchmarks/bench_user_timeline.py --device cuda --png-threads 1      # the PNG writer on one thread
    python benchmarks/bench_user_timeline.py --device cuda --sampler ddpm --copied-draws   # control: no host draws
    python benchmarks/bench_user_timeline.py --device cuda --preset w8a4-modiff --one-pass-modulation

Why: `bench_sampling.py` measures the user path (`modiff sample`: PNGs, grid, samples.npz, manifest) slower than
the sampling loop alone, and a host profile (cProfile) slows the run it explains. Here the phases of
`modiff.pipelines.generate` are timed by wrapping them, which costs a few microseconds per call: opening the
run, each batch's initial noise (drawn on a background thread while the batch before it samples; before
sitting 33 inside its sampling loop, with the device waiting), the noise of DDPM's steps (each drawn on a thread
of its own while the step before runs, since sitting 40) and the sampling loop's wait for it, sampling loop
(enqueued; CUDA graphs are recorded in the first batch's), bookkeeping (which waits for the device), the wait
for the PNG writer and closing the run (the rest of the wall time is wrapping the network and the folder lock),
and how many PNGs the writer thread still had to write when each batch was read back. On
CUDA each batch's device time comes from events around its sampling loop, so "device idle" = the call's wall
time minus the device's busy time. A warm-up call (one batch, another folder) compiles the network first.
``--png-threads`` sets the PNG writer's threads (default: `PngWriter`'s, `host_threads()`), to compare thread
counts in the user path itself rather than in `bench_png_writer.py`'s isolation. ``--copied-draws`` is a
control for the draws' host cost: every draw copies one fixed block of normals instead of drawing each seed's
(wrong images, the same device work), so DDPM's device step is timed without the host's draws beside it.
``--one-pass-modulation`` runs MoDiff's modulation step as one kernel (`modiff.quant.kernels.modulate.
one_pass_modulation`) instead of two; compare it with a run without, each in its own process.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, get_args

import torch

import modiff as md
from modiff.pipelines import generate as generate_module
from modiff.pipelines.generate import SampleConfig, SamplerName, generate
from modiff.quant import presets, quantize, trajectory
from modiff.quant.kernels.modulate import one_pass_modulation
from modiff.utils import images as images_module
from modiff.utils.device import host_threads
from modiff.utils.images import PngWriter
from modiff.utils.rng import DrawsAhead, SeedStreams

from bench_models import benchmark_model

PHASES = {  # label -> (object, attribute) timed around each call
    "open the run": (generate_module, "_open_run"),
    "noise draws (x_T; ddpm: every step's too, on the draws-ahead thread)": (SeedStreams, "draw_into"),
    "wait for a step's noise drawn ahead": (DrawsAhead, "__next__"),
    "sampling loop, enqueued": (generate_module, "sample"),
    "batch bookkeeping (waits for the device)": (generate_module, "_write_batch"),
    "wait for the PNG writer": (PngWriter, "__exit__"),
    "close the run (grid, samples.npz, manifest)": (generate_module, "_close_run"),
}


class Timeline:
    """Seconds of each phase (summed over its calls) and, on CUDA, the device's busy seconds per batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self._lock = threading.Lock()  # the draws are timed on background threads too
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.file_times: list[float] = []  # when the writer thread finished each PNG
        self.batch_reads: list[float] = []  # when each batch's images were on the host and queued for writing

    def _timed(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[label] += time.perf_counter() - start
                    self.calls[label] += 1
        return wrapper

    def _device_timed(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = function(*args, **kwargs)
            end.record()
            self.events.append((begin, end))
            return out
        return wrapper

    def _stamped(self, times: list[float], function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = function(*args, **kwargs)
            times.append(time.perf_counter())  # list.append is atomic: safe from the writer thread
            return out
        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator["Timeline"]:
        originals = [(owner, name, getattr(owner, name)) for owner, name in PHASES.values()]
        originals.append((images_module, "write_bytes_atomic", images_module.write_bytes_atomic))
        try:
            for label, (owner, name) in PHASES.items():
                timed = self._timed(label, getattr(owner, name))
                if label == "sampling loop, enqueued" and self.device.type == "cuda":
                    timed = self._device_timed(timed)
                if label == "batch bookkeeping (waits for the device)":
                    timed = self._stamped(self.batch_reads, timed)
                setattr(owner, name, timed)
            images_module.write_bytes_atomic = self._stamped(self.file_times, images_module.write_bytes_atomic)
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def writer_backlog(self, batch: int) -> list[int]:
        """PNGs queued but not yet written when each batch was read back (the last: the files left for after
        the device is done)."""
        return [(k + 1) * batch - sum(t <= read for t in self.file_times) for k, read in enumerate(self.batch_reads)]

    def device_busy(self) -> list[float]:
        """Seconds from each batch's first queued work to its sampled x_0 on the device."""
        torch.cuda.synchronize(self.device)
        return [begin.elapsed_time(end) / 1e3 for begin, end in self.events]


@contextlib.contextmanager
def png_threads(threads: Optional[int]) -> Iterator[None]:
    """`generate`'s PNG writers on ``threads`` threads inside the block (None: their default)."""
    original = generate_module.PngWriter
    if threads is not None:
        generate_module.PngWriter = functools.partial(original, threads=threads)
    try:
        yield
    finally:
        generate_module.PngWriter = original


@contextlib.contextmanager
def copied_draws(enabled: bool) -> Iterator[None]:
    """Inside the block (if ``enabled``) `SeedStreams.draw_into` copies one fixed block of standard normals per
    buffer shape into its buffer instead of drawing each seed's own: the same buffers and device work, almost
    none of the host's."""
    original = SeedStreams.draw_into
    if enabled:
        blocks: dict[tuple[int, ...], torch.Tensor] = {}

        def copy_block(streams: SeedStreams, out: torch.Tensor) -> None:
            shape = tuple(out.shape)
            if shape not in blocks:  # two threads may both make it: the same values either way
                blocks[shape] = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            out.copy_(blocks[shape])

        SeedStreams.draw_into = copy_block
    try:
        yield
    finally:
        SeedStreams.draw_into = original


def timed_call(model: torch.nn.Module, batch: int, batches: int, config: SampleConfig, device: torch.device,
               work: Path, writer_threads: Optional[int] = None, copy_draws: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=work, prefix="bench-timeline-") as folder, png_threads(writer_threads), \
            copied_draws(copy_draws):
        run = lambda seeds, name: generate(model, seeds, Path(folder) / name, config, batch_size=batch,  # noqa: E731
                                           device=str(device), prepare=trajectory, progress=False)
        run(range(batch), "warmup")
        timeline = Timeline(device)
        with timeline.installed():
            start = time.perf_counter()
            run(range(10**6, 10**6 + batch * batches), "timed")
            wall = time.perf_counter() - start
    result: dict[str, Any] = {"images": batch * batches, "png_threads": writer_threads or host_threads(),
                              "copied_draws": copy_draws,
                              "wall_s": round(wall, 3),
                              "images_per_s": round(batch * batches / wall, 1),
                              "phases_s": {k: round(v, 6) for k, v in timeline.seconds.items()},
                              "calls": dict(timeline.calls),
                              "writer_backlog_at_each_batch_read": timeline.writer_backlog(batch)}
    if device.type == "cuda":
        busy = timeline.device_busy()
        result.update(device_busy_s=[round(b, 3) for b in busy], device_idle_s=round(wall - sum(busy), 3),
                      network_only_images_per_s=round(batch * batches / sum(busy), 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="fmnist-ddim")
    parser.add_argument("--preset", default="fp", help="fp or a quantization preset")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--sampler", default="ddim", choices=get_args(SamplerName),
                        help="ddpm (and ddim at --eta > 0) draws each seed's noise at every step")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where run folders go")
    parser.add_argument("--png-threads", type=int, default=None, help="the PNG writer's threads (default: its own)")
    parser.add_argument("--copied-draws", action="store_true",
                        help="control: copy one fixed block of noise instead of drawing (wrong images, same device work)")
    parser.add_argument("--one-pass-modulation", action="store_true",
                        help="MoDiff's modulation step as one kernel instead of two (CUDA, quantized presets)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if min(args.batch_size, args.batches, args.steps) < 1 or (args.png_threads is not None and args.png_threads < 1):
        parser.error("--batch-size, --batches, --steps and --png-threads must be >= 1")
    if args.preset != "fp" and args.preset not in presets:
        parser.error(f"unknown preset {args.preset!r}")
    if args.one_pass_modulation and args.preset == "fp":
        parser.error("--one-pass-modulation needs a quantized preset: fp has no modulation step")
    device = torch.device(args.device)
    base = benchmark_model(args.model)
    model = base if args.preset == "fp" else quantize(base, presets[args.preset])
    config = SampleConfig(sampler=args.sampler, steps=args.steps, spacing=md.default_spacing(base))
    with one_pass_modulation(args.one_pass_modulation):
        timings = timed_call(model, args.batch_size, args.batches, config, device, args.work, args.png_threads,
                             args.copied_draws)
    result = {"model": args.model, "preset": args.preset, "sampler": args.sampler, "batch": args.batch_size,
              "steps": args.steps, "one_pass_modulation": args.one_pass_modulation, **timings}
    print(json.dumps(result, indent=1))
    if args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
