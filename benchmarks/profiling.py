"""Where the time of one run goes: a kernel table from torch.profiler, for the benchmarks' --profile, and
the device time of a launch; the arguments of the CUDA kernel micro-benchmarks."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_table(run: Callable[..., object], device: torch.device, rows: int = 30, skip_steps: int = 0) -> str:
    """Profile one call of `run`: the operators with the most device time (CPU time on the CPU), and the
    number of kernel launches, which matters when a step is launch-bound. With ``skip_steps``, `run` takes a
    callback that the sampler calls after each step, and the table covers only the steps after the first
    ``skip_steps``: a MoDiff trajectory's first step is its warm-up, run eagerly in full precision, and in a
    short profiled trajectory it would weigh as much as the steps being studied."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    prof, done = profile(activities=activities), [0]
    started = False

    def begin() -> None:
        nonlocal started
        sync()
        prof.start()
        started = True

    def after_step(*_: object) -> None:
        done[0] += 1
        if done[0] == skip_steps:
            begin()

    try:
        if skip_steps:
            run(after_step)
        else:
            begin()
            run()
        sync()
    finally:
        if started:  # a profiler left running breaks the interpreter's exit
            prof.stop()
    if skip_steps and done[0] <= skip_steps:
        raise ValueError(f"the profiled run took {done[0]} steps: nothing is left after skipping {skip_steps}")
    events = prof.key_averages()
    sort_by = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))
    steps = f"steps profiled: {done[0] - skip_steps} (the first {skip_steps} skipped)\n" if skip_steps else ""
    return f"{steps}kernel launches: {launches}\n" + events.table(sort_by=sort_by, row_limit=rows)


def write_profiles(tables: dict[str, str], path: str | Path) -> None:
    text = "".join(f"=== {name} ===\n{table}\n\n" for name, table in tables.items())
    Path(path).write_text(text)
    print(f"wrote {path}")


def device_us_trials(run: Callable[[], object], trials: int = 5, repeats: int = 20, warmup: int = 3,
                     graph: bool = False) -> list[float]:
    """Microseconds per call of `run`, once per trial: CUDA events around `repeats` calls, after `warmup` calls.
    Eager, the events also take in whatever the host adds when it launches slower than the device computes;
    with ``graph`` the `repeats` calls are captured once as a CUDA graph and its replays are timed: device time
    alone. Several trials show whether a timing repeats (benchmarks/README.md has cases where it did not)."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    launch, launches = run, repeats
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(repeats):
                run()
        launch, launches = captured.replay, 1
        launch()
        torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            launch()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / repeats * 1e3)
    return times


def device_us(run: Callable[[], object], trials: int = 5, repeats: int = 20, warmup: int = 3,
              graph: bool = False) -> float:
    """The median over `device_us_trials`."""
    return statistics.median(device_us_trials(run, trials, repeats, warmup, graph))


def cuda_kernel_args(doc: str, script: str, batch: int,
                     more: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                     needs_cuda: Callable[[argparse.Namespace], bool] = lambda args: True) -> argparse.Namespace:
    """``--batch`` and ``--out`` of a kernel micro-benchmark (and the options ``more`` adds); exits with a
    message without CUDA, unless ``needs_cuda`` says these arguments do not need it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--out")
    if more:
        more(parser)
    args = parser.parse_args()
    if needs_cuda(args) and not torch.cuda.is_available():
        raise SystemExit(f"{script} needs CUDA")
    return args
