"""MoDiff's residual step sizes with their block inputs captured a group of blocks at a time (the default
budget) against one capture pair per block (``capture_budget=0``), side by side in one process.

    python3 benchmarks/bench_residual_capture.py --model fmnist-ldm --device cuda --out benchmarks/results/residual_capture_gpu.json
    python3 benchmarks/bench_residual_capture.py --model fmnist-ldm --device cpu --samples-per-step 16 --calib-steps 4 \\
        --set activations.iters=5 --repeats 2 --out benchmarks/results/residual_capture_cpu.json

Both runs calibrate the same quantized model (round-to-nearest weights: the step sizes' time does not depend on the
codes) from one calibration set, alternating which goes first; the JSON says whether their scales are identical.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from modiff.cli.calibrate import apply_overrides
from modiff.models.conventions import default_spacing
from modiff.models.registry import load_model
from modiff.quant import presets, quantize
from modiff.quant.api import quant_layers
from modiff.quant.ptq.calibrate import CalibrationConfig, weight_only_config
from modiff.quant.ptq.data import CalibDataConfig, collect_calib_data
from modiff.quant.ptq.lsq import learn_residual_step_sizes
from modiff.quant.ptq.reconstruct import CAPTURE_BUDGET, reconstruction_units
from modiff.utils.runs import environment, write_json


def timed_run(fp: torch.nn.Module, preset: str, data, recipe: CalibrationConfig, budget: int) -> tuple[float, dict]:
    """Seconds of the residual step sizes of ``preset`` with ``capture_budget=budget``, and the scales learned."""
    config = presets[preset].with_weight_codes("nearest")
    qmodel = quantize(fp, config)
    units = reconstruction_units(quantize(fp, weight_only_config(config)), data)
    if data.x.device.type == "cuda":
        torch.cuda.synchronize(data.x.device)
    started = time.perf_counter()
    learn_residual_step_sizes(qmodel, fp, data, units, recipe.activations, recipe.capture_batch, progress=False,
                              capture_budget=budget)
    if data.x.device.type == "cuda":
        torch.cuda.synchronize(data.x.device)
    seconds = time.perf_counter() - started
    scales = {name: [s.detach().cpu().clone() for s in layer.act.scales]
              for name, layer in quant_layers(qmodel).items() if layer.act is not None}
    return seconds, scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-ldm")
    parser.add_argument("--preset", default="qdiff-w8a4-modiff")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples-per-step", type=int, default=256)
    parser.add_argument("--calib-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each budget, alternating")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (as modiff calibrate)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not presets[args.preset].stateful:
        raise SystemExit(f"{args.preset} is not a MoDiff preset: its step sizes have no residual captures")
    device = torch.device(args.device)
    model = load_model(args.model).to(device).eval()
    data_config = CalibDataConfig(steps=100, spacing=default_spacing(model), calib_steps=args.calib_steps,
                                  samples_per_step=args.samples_per_step)
    data = collect_calib_data(model, data_config, device)
    recipe = apply_overrides(CalibrationConfig(), args.overrides)
    fp = copy.deepcopy(model)
    budgets = {"one capture pair per block": 0, "grouped (the default)": CAPTURE_BUDGET}
    rows: dict[str, list[float]] = {name: [] for name in budgets}
    scales: dict[str, dict] = {}
    for repeat in range(args.repeats):
        order = list(budgets) if repeat % 2 == 0 else list(reversed(budgets))
        for name in order:
            seconds, scales[name] = timed_run(fp, args.preset, data, recipe, budgets[name])
            rows[name].append(round(seconds, 3))
            print(f"{name}: {seconds:.2f} s", flush=True)
    first, second = (scales[name] for name in budgets)
    identical = first.keys() == second.keys() and all(
        all(torch.equal(a, b) for a, b in zip(first[k], second[k])) for k in first)
    best = {name: min(times) for name, times in rows.items()}
    speedup = best["one capture pair per block"] / best["grouped (the default)"]
    print(f"grouped: {speedup:.2f}x faster (best of {args.repeats}); scales identical: {identical}")
    if args.out:
        write_json({"model": args.model, "preset": args.preset, "samples": len(data), "recipe": recipe.to_dict(),
                    "seconds": rows, "speedup_best": round(speedup, 3), "scales_identical": identical,
                    "environment": environment(str(device))}, args.out)


if __name__ == "__main__":
    main()
