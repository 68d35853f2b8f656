"""Time of Q-Diffusion calibration: the full recipe on fmnist-ddim, and per block on the CIFAR-10-size UNet.

    python3 benchmarks/bench_calibrate.py --device cuda --out benchmarks/results/calibrate_gpu.json
    python3 benchmarks/bench_calibrate.py --device cuda --set adaround.cuda_graphs=false --set activations.cuda_graphs=false
    python3 benchmarks/bench_calibrate.py --device cpu --tiny --out /tmp/calibrate_cpu.json

1. fmnist-ddim (the shipped weights): calibration data (20 of 100 steps x 256 samples, one DDIM pass),
   then the full recipe of each preset (W4 AdaRound, 20k iterations per block, and activation step
   sizes, 5k per block or residual layer). AdaRound runs once per weight quantization and is shared,
   as the reproduce notebooks share it; each preset's time counts it in full.
2. CIFAR-10-size UNet (ch 128, random weights, random inputs): for every block, the capture time and
   the time of ``--cifar-iters`` AdaRound iterations, extrapolated to the published 20k.
``--tiny``: the test suite's tiny UNet with few iterations (a CPU smoke run of the same code).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from modiff.cli.calibrate import apply_overrides
from modiff.diffusion.schedules import linear_schedule
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser, load_model
from modiff.quant import presets, quantize
from modiff.quant.ptq.data import CalibData, CalibDataConfig, collect_calib_data
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate, calibrate_weights, weight_only_config
from modiff.quant.ptq.reconstruct import capture_unit, reconstruct_weights, reconstruction_units
from modiff.utils.runs import environment, write_json

CIFAR = DDIMUNetConfig(ch=128, in_channels=3, out_ch=3)
TINY = DDIMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), in_channels=1, out_ch=1, image_size=16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _full_recipe(model: torch.nn.Module, data_config: CalibDataConfig, recipe: CalibrationConfig,
                 names: list[str], device: torch.device) -> dict:
    """Calibration data, then per preset its AdaRound weights (once per weight quantization, shared as
    `quantized_model` shares them) and its activation step sizes; a preset's full recipe is the sum."""
    started = time.time()
    data = collect_calib_data(model.to(device).eval(), data_config, device)
    _sync(device)
    result: dict = {"data_seconds": round(time.time() - started, 2), "samples": len(data), "presets": {}}
    shared: dict[str, tuple[torch.nn.Module, float, dict]] = {}
    for name in names:
        key = json.dumps(weight_only_config(presets[name]).to_dict(), sort_keys=True, default=str)
        if key not in shared:
            weights, report = calibrate_weights(model, presets[name], data, recipe)
            _sync(device)
            shared[key] = (weights, report["seconds_weights"], report.get("weights"))
        weights, weight_seconds, weight_units = shared[key]
        started = time.time()
        _, report = calibrate(model, presets[name], data, recipe, weights=weights)
        _sync(device)
        act_seconds = round(time.time() - started, 2)
        result["presets"][name] = {"seconds": round(weight_seconds + act_seconds, 2), "units": report["units"],
                                   "seconds_weights": weight_seconds, "seconds_activations": act_seconds,
                                   "weights": weight_units, "activations": report.get("activations")}
        print(f"{name}: {result['presets'][name]['seconds']} s (weights {weight_seconds} s, shared by presets with "
              f"the same weight quantization; activations {act_seconds} s)", flush=True)
    return result


def _random_data(config: DDIMUNetConfig, n: int, device: torch.device) -> CalibData:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (n, config.in_channels, config.image_size, config.image_size)
    x = torch.randn(shape, generator=gen).to(device, torch.float16)
    t = torch.randint(0, 1000, (n,), generator=gen).to(device)
    return CalibData(x=x, t=t, x_before=x, t_before=t, index=t,
                     config=CalibDataConfig(calib_steps=1, samples_per_step=n))


def _per_block(config: DDIMUNetConfig, recipe: CalibrationConfig, iters: int, n: int, device: torch.device) -> dict:
    """Capture and AdaRound time of every unit, measured at ``iters`` iterations, extrapolated to the recipe's."""
    torch.manual_seed(0)
    fp = Denoiser(DDIMUNet(config), linear_schedule(), "cifar10-random", {}).to(device).eval()
    data = _random_data(config, n, device)
    wq = quantize(fp, replace(presets["w4a32"], split_shortcut=True))
    units = reconstruction_units(wq, data)
    adaround = replace(recipe.weights, iters=iters, log_every=iters)
    rows, dtype = [], getattr(torch, adaround.storage_dtype)
    for unit in units:
        _sync(device)
        started = time.time()
        capture_unit(wq, fp, data, unit, recipe.capture_batch, dtype)
        _sync(device)
        capture = time.time() - started
        record = reconstruct_weights(wq, fp, data, [unit], adaround, recipe.capture_batch, progress=False)[0]
        _sync(device)
        per_iter = max(record["seconds"] - capture, 0.0) / iters
        rows.append({"unit": unit.name, "layers": len(unit.layers), "capture_s": round(capture, 3),
                     "per_iter_ms": round(1e3 * per_iter, 4),
                     "est_adaround_s": round(capture + per_iter * recipe.weights.iters, 2)})
        print(f"{unit.name}: capture {capture:.2f} s, {1e3 * per_iter:.3f} ms/iteration", flush=True)
    total = sum(r["est_adaround_s"] for r in rows)
    return {"units": rows, "samples": n, "iters_measured": iters, "iters_published": recipe.weights.iters,
            "est_adaround_total_s": round(total, 1), "est_per_block_mean_s": round(total / len(rows), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", default="qdiff-w4a4,qdiff-w4a4-modiff")
    parser.add_argument("--samples-per-step", type=int, default=256)
    parser.add_argument("--cifar-iters", type=int, default=500, help="AdaRound iterations timed per CIFAR block.")
    parser.add_argument("--cifar-samples", type=int, default=5120, help="Random calibration inputs for the CIFAR UNet.")
    parser.add_argument("--skip-fmnist", action="store_true")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="Tiny UNet, few iterations (CPU smoke run).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override (as modiff calibrate).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibrate_gpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    recipe = CalibrationConfig()
    data_config = CalibDataConfig(samples_per_step=args.samples_per_step)
    if args.tiny:
        recipe = apply_overrides(recipe, ("adaround.iters=20", "activations.iters=10", "adaround.log_every=10",
                                          "activations.log_every=10"))
        data_config = CalibDataConfig(steps=10, calib_steps=3, samples_per_step=8)
    recipe = apply_overrides(recipe, tuple(args.overrides))
    result: dict = {"environment": environment(device), "recipe": recipe.to_dict()}
    if not args.skip_fmnist:
        model = Denoiser(DDIMUNet(TINY), linear_schedule(), "tiny", {}) if args.tiny else load_model("fmnist-ddim")
        result["fmnist-ddim"] = _full_recipe(model, data_config, recipe, args.presets.split(","), device)
    if not args.skip_cifar:
        config, n = (TINY, 64) if args.tiny else (CIFAR, args.cifar_samples)
        result["cifar10-unet"] = _per_block(config, recipe, 10 if args.tiny else args.cifar_iters, n, device)
        print(f"CIFAR-10 UNet: estimated {result['cifar10-unet']['est_adaround_total_s']} s of AdaRound "
              f"({result['cifar10-unet']['est_per_block_mean_s']} s per unit)", flush=True)
    write_json(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, default=str)[:2000])


if __name__ == "__main__":
    main()
