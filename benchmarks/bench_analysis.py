"""Wall time of the two analysis notebooks that dominate the paper preset, side by side in one process:
the theory sweep of `notebooks/theory_bounds.ipynb` (operator norms, `sweep_trajectories`, the bound
checks and their summary) and `experiments.published_audit` of `notebooks/published_audit.ipynb`.

    python benchmarks/bench_analysis.py --device cuda --calib 64 --heldout 64 --steps 100   # the paper preset
    nice python benchmarks/bench_analysis.py --device cpu --calib 2 --heldout 2 --steps 20 --audit-steps 20

The embedded `fmnist-ddim` model, every Conv/Linear layer, bits 8/6/4/3, both quantizers, float32 (as the
notebooks run it). Operator norms are computed afresh (no cache). Each phase is timed once, after the
device has finished its work; the table goes to stdout and, with ``--out``, to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import modiff as md
from analysis import experiments, theory_checks, theory_sweep
from modiff.utils.device import resolve_device


@contextmanager
def _timed(times: dict[str, float], phase: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times[phase] = time.perf_counter() - start


def _theory(net: md.Denoiser, args: argparse.Namespace, times: dict[str, float], device: torch.device) -> int:
    """The theory notebook's computations; the number of sweep rows."""
    config = theory_sweep.SweepConfig(steps=args.steps, batch_size=args.batch_size, dtype="float32", device=args.device)
    layers = theory_sweep.select_layers(net)
    with _timed(times, "operator_norms", device):
        norms = theory_sweep.operator_norms(net, layers, device=args.device)
    calibration, heldout = range(args.calib), range(args.calib, args.calib + args.heldout)
    with _timed(times, "sweep", device):
        stats = theory_sweep.sweep_trajectories(net, layers, calibration, heldout, config)
    with _timed(times, "estimate_c", device):
        c_calibration = theory_checks.estimate_c(stats, "calibration")
        c_heldout = theory_checks.estimate_c(stats, "held-out")
    with _timed(times, "bound_checks", device):
        checks = theory_checks.bound_checks(stats, norms)
    with _timed(times, "summary", device):
        summary = theory_checks.tightness_summary(checks)
        theory_checks.decay_failures(c_calibration)
        theory_checks.findings(summary, checks, c_calibration, c_heldout)
    return len(stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--calib", type=int, default=2, help="calibration trajectories of the sweep (default 2)")
    parser.add_argument("--heldout", type=int, default=2, help="held-out trajectories of the sweep (default 2)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the sweep (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="trajectories sampled together (default 64)")
    parser.add_argument("--audit-steps", type=int, default=20, help="sampling steps of the audit; 0 skips it")
    parser.add_argument("--skip-theory", action="store_true", help="time the audit only")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    net = md.load_model("fmnist-ddim")
    times: dict[str, float] = {}
    rows = 0 if args.skip_theory else _theory(net, args, times, device)
    if args.audit_steps:
        with _timed(times, "published_audit", device):
            experiments.published_audit(net, 4, range(4), args.audit_steps, device=args.device)
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "sweep_rows": rows,
              "sizes": {k: getattr(args, k) for k in ("calib", "heldout", "steps", "batch_size", "audit_steps")},
              "seconds": {phase: round(seconds, 2) for phase, seconds in times.items()}}
    print(f"{device}, {result['torch_threads']} torch threads, sizes {result['sizes']}, {rows:,} sweep rows")
    for phase, seconds in result["seconds"].items():
        print(f"  {phase:16s} {seconds:9.2f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
