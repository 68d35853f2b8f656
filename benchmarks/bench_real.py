"""Real low-bit MoDiff on one GPU: images/s of W8A8 and W4A8 on tensor cores against compiled bf16, and its error.

    python benchmarks/bench_real.py --out benchmarks/results/real_h200.json
    python benchmarks/bench_real.py --archs cifar10 --batch-sizes 512 --variants fp,real-int8-modiff --profile
    python benchmarks/bench_real.py --fid 10000 --variants none --out fid.json    # FID only
    python benchmarks/bench_real.py --device cpu --archs fmnist-ddim --batch-sizes 2 --steps 3 --variants fp,real-int8-modiff

One process. Every variant runs the real sampling loop (`modiff.pipelines.generate.sample`, DDIM, ``--steps``) on
the fast path of `modiff.pipelines.execution` (bf16 autocast, channels_last, torch.compile, CUDA graphs) after a
3-step warm-up trajectory (compilation, graph recording), then ``--repeats`` timed trajectories (median):

  fp                 the baseline: full precision, compiled bf16 with CUDA graphs
  sim-int8-modiff    the simulator of W8A8 MoDiff (fake-quantized bf16 convolutions)
  real-int8, real-fp8                 direct W8A8 on the real kernels (`modiff.quant.kernels.real`)
  real-int8-modiff, real-fp8-modiff   W8A8 MoDiff on them, state (a_hat, o_hat) in float32 (state_dtype auto)
  real-int8-modiff-bf16               the same with a bfloat16 state
  real-w4a8, real-w4a8-modiff         4-bit weights (nibble-packed, widened to INT8 in the GEMM), INT8 activations
  sim-w4a8-modiff                     the simulator of W4A8 MoDiff
  torchao-fp8, torchao-int8           torchao's Float8DynamicActivationFloat8WeightConfig and
                     Int8DynamicActivationInt8WeightConfig (default arguments but set_inductor_config=False)
                     through `quantize_` on the bf16 network, asked for Conv2d and Linear; if it refuses Conv2d,
                     Linear only (the row records which layers it quantized). Skipped with the reason when torchao
                     does not import. set_inductor_config=True (torchao's default) would switch on inductor's
                     coordinate-descent tuning of every kernel for the rest of the process, and TF32 matmuls: the
                     rows would no longer share fp's compiler settings (and tuning a UNet's kernels takes minutes).

Architectures: cifar10 (the CIFAR-10 DDIM UNet, random weights) and fmnist-ddim (the shipped model).
Per-step error (``--error-batch``, 0 skips): for INT8, FP8 and W4A8 (``--error-formats`` picks) and both state dtypes, the relative L2 error of eps
of the real MoDiff model against the simulated one (same config), and of both against the fp model, per step,
eager under bf16 autocast: teacher-forced (every model called on the fp trajectory's x_t, its MoDiff state
carried) and free-running (each model on its own trajectory). ``--fid N``: FID (with its bootstrap interval) of N fmnist-ddim samples of fp (bf16 and IEEE
float32), real W8A8 INT8 MoDiff and its simulator (under bf16 autocast and in IEEE float32) against the shipped
Fashion-MNIST statistics, with the paired-bootstrap FID difference of real against simulated, of the two
simulators, and of each against fp (`FID_PAIRS`); ``--fid-runs`` picks some of the runs (`FID_RUNS`). ``--profile``: a kernel table per variant at the largest batch of a 6-step trajectory
(uniform timesteps: 7 steps) after its first step (MoDiff's warm-up, eager and in full precision, once per
trajectory); the table's first line says how many steps it covers. Every variant runs in try/except: an error is recorded in its row and the
run continues; the JSON (``--out``) is rewritten, atomically, after every row and every error format and state. The error runs come first; ``--budget``
seconds (from the start) stops starting new rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import modiff as md
from modiff.models.registry import Denoiser
from modiff.diffusion.sampling import StepInfo
from modiff.pipelines.execution import ExecutionConfig, precision_context, prepared_network, resolve_precision
from modiff.pipelines.generate import SampleConfig, sample
from modiff.quant import presets, quantize, trajectory
from modiff.quant.layers.real import backend_record
from modiff.utils.runs import write_json

from bench_models import benchmark_model
from profiling import kernel_table

FAST = ExecutionConfig(precision="bf16", compile=True, cuda_graphs=True)
EAGER = ExecutionConfig(precision="bf16")
VARIANTS: dict[str, Optional[str]] = {  # name -> preset (None: fp; torchao-*: the torchao config)
    "fp": None, "real-int8-modiff": "w8a8-int8-modiff-real", "real-fp8-modiff": "w8a8-fp8-modiff-real",
    "real-int8": "w8a8-int8-real", "real-fp8": "w8a8-fp8-real", "sim-int8-modiff": "w8a8-int8-modiff",
    "torchao-fp8": "Float8DynamicActivationFloat8WeightConfig", "torchao-int8": "Int8DynamicActivationInt8WeightConfig",
    "real-int8-modiff-bf16": "w8a8-int8-modiff-real", "real-w4a8": "w4a8-int8-real",
    "real-w4a8-modiff": "w4a8-int8-modiff-real", "sim-w4a8-modiff": "w4a8-int8-modiff",
}
STATE = {"real-int8-modiff-bf16": "bfloat16"}


def _quantized(arch: str, preset: str, state_dtype: str = "auto") -> Denoiser:
    return quantize(benchmark_model(arch), dataclasses.replace(presets[preset], state_dtype=state_dtype))


def _torchao(arch: str, config_name: str) -> tuple[Denoiser, dict[str, Any]]:
    """The bf16 network through torchao's quantize_, Conv2d and Linear asked for (Linear only if refused)."""
    import torchao
    from torchao import quantization

    notes: dict[str, Any] = {"torchao": torchao.__version__, "config": f"{config_name}(set_inductor_config=False)"}
    for layers in ((nn.Conv2d, nn.Linear), (nn.Linear,)):
        model = benchmark_model(arch)
        model.net = model.net.to(torch.bfloat16).cuda()
        try:
            quantization.quantize_(model.net, getattr(quantization, config_name)(set_inductor_config=False),
                                   filter_fn=lambda m, fqn, layers=layers: isinstance(m, layers))
        except Exception as err:  # noqa: BLE001 - torchao's refusal of Conv2d is a result to record
            notes[f"refused {'+'.join(t.__name__ for t in layers)}"] = f"{type(err).__name__}: {err}"[:300]
            continue
        counts: dict[str, int] = {}
        for module in model.net.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and type(getattr(weight, "data", weight)) is not torch.Tensor:
                counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        notes["quantized_layers"] = counts
        return model, notes
    raise RuntimeError(f"torchao refused every layer kind: {notes}")


def _build(arch: str, variant: str) -> tuple[Denoiser, dict[str, Any]]:
    preset = VARIANTS[variant]
    if variant.startswith("torchao-"):
        return _torchao(arch, preset)
    if preset is None:
        return benchmark_model(arch), {}
    return _quantized(arch, preset, STATE.get(variant, "auto")), {"preset": preset,
                                                                   "state_dtype": STATE.get(variant, "auto")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trajectory(runner: nn.Module, batch: int, steps: int, device: torch.device,
                callback: Optional[Callable] = None) -> float:
    _sync(device)
    start = time.perf_counter()
    with trajectory(runner):
        sample(runner, range(batch), SampleConfig(steps=steps, precision="bf16"), device, callback)
    _sync(device)
    return time.perf_counter() - start


def _time_row(model: Denoiser, execution: ExecutionConfig, batch: int, args: argparse.Namespace,
              device: torch.device) -> dict[str, Any]:
    with prepared_network(model, device, execution) as runner:
        started = time.perf_counter()
        _trajectory(runner, batch, 3, device)  # compilation, autotuning, graph recording
        warmup = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [_trajectory(runner, batch, args.steps, device) for _ in range(args.repeats)]
        row = {"warmup_s": round(warmup, 1), "runs_s": [round(r, 3) for r in runs],
               "images_per_s": round(batch / statistics.median(runs), 2),
               "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else 0}
        if args.profile:
            row["profile"] = kernel_table(lambda after_step: _trajectory(runner, batch, 6, device, after_step),
                                          device, rows=25, skip_steps=1)  # the steps after MoDiff's warm-up
    return row


def _eps(model: Denoiser, batch: int, steps: int, device: torch.device) -> tuple[list[torch.Tensor], list[tuple]]:
    """eps of each step of the model's own trajectory, and the (x_t, t) it was called with."""
    eps: list[torch.Tensor] = []
    inputs: list[tuple[torch.Tensor, int]] = []

    def keep(step: StepInfo) -> None:
        eps.append(step.eps.float())
        inputs.append((step.x_t.clone(), step.t))
    with prepared_network(model, device, EAGER) as runner:
        _trajectory(runner, batch, steps, device, callback=keep)
    return eps, inputs


def _eps_teacher_forced(model: Denoiser, inputs: list[tuple[torch.Tensor, int]],
                        device: torch.device) -> list[torch.Tensor]:
    """eps of the model called on another model's x_t at every step, its MoDiff state carried across the calls:
    the difference to that model's eps is one step's arithmetic, not a diverged trajectory."""
    eps: list[torch.Tensor] = []
    with prepared_network(model, device, EAGER) as runner, trajectory(runner), torch.no_grad(), \
            precision_context(resolve_precision("bf16", device), device):
        for x, t in inputs:
            eps.append(runner(x, torch.full((x.shape[0],), t, device=device, dtype=torch.long)).float())
    return eps


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [round(float((x - y).norm() / y.norm()), 6) for x, y in zip(a, b)]


def _summary(values: list[float]) -> dict[str, Any]:
    return {"max": max(values), "mean": round(sum(values) / len(values), 6), "per_step": values}


ERROR_FORMATS = {"int8": "w8a8-int8-modiff", "fp8": "w8a8-fp8-modiff", "w4a8": "w4a8-int8-modiff"}  # -> simulated preset


def _errors(arch: str, batch: int, steps: int, device: torch.device, formats: list[str],
            on_result: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Per-step relative error of eps, real vs simulated MoDiff (same config) and each against fp: teacher-forced
    (both called on the fp trajectory's x_t, `_eps_teacher_forced`) and free-running (each on its own trajectory,
    where the chaotic dynamics of a quantized net amplify one-step differences). ``on_result`` gets the results so
    far after each format and state, so a run stopped midway keeps what it measured."""
    out: dict[str, Any] = {"batch": batch, "steps": steps}
    fp, fp_inputs = _eps(benchmark_model(arch), batch, steps, device)
    for fmt in formats:
        simulated = ERROR_FORMATS[fmt]
        for state in ("float32", "bfloat16"):
            key = f"{fmt}-state-{state}"
            try:
                real_model = _quantized(arch, f"{simulated}-real", state)
                sim_model = _quantized(arch, simulated, state)
                real_forced = _eps_teacher_forced(real_model, fp_inputs, device)
                sim_forced = _eps_teacher_forced(sim_model, fp_inputs, device)
                real, sim = _eps(real_model, batch, steps, device)[0], _eps(sim_model, batch, steps, device)[0]
                pairs = {"teacher_forced_real_vs_sim": _relative(real_forced, sim_forced),
                         "teacher_forced_real_vs_fp": _relative(real_forced, fp),
                         "teacher_forced_sim_vs_fp": _relative(sim_forced, fp),
                         "free_running_real_vs_sim": _relative(real, sim), "free_running_real_vs_fp": _relative(real, fp),
                         "free_running_sim_vs_fp": _relative(sim, fp)}
                out[key] = {name: _summary(v) for name, v in pairs.items()}
            except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                out[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
            print(json.dumps({key: {k: v.get("max") if isinstance(v, dict) else v for k, v in out[key].items()}}),
                  flush=True)
            on_result(out)
    return out


FID_RUNS: dict[str, tuple[Optional[str], str]] = {  # name -> (preset, None for fp; the run's arithmetic)
    "fp": (None, "bf16"),
    "real-int8-modiff": ("w8a8-int8-modiff-real", "bf16"),
    "sim-int8-modiff": ("w8a8-int8-modiff", "bf16"),
    "sim-int8-modiff-fp32": ("w8a8-int8-modiff", "fp32"),
    "fp-fp32": (None, "fp32"),  # the float32 simulator's own anchor
}
FID_PAIRS = (("real-int8-modiff", "sim-int8-modiff"), ("sim-int8-modiff-fp32", "sim-int8-modiff"),
             ("real-int8-modiff", "sim-int8-modiff-fp32"), ("real-int8-modiff", "fp"), ("sim-int8-modiff", "fp"),
             ("sim-int8-modiff-fp32", "fp"), ("sim-int8-modiff-fp32", "fp-fp32"), ("fp-fp32", "fp"))


def _fid(samples: int, batch: int, steps: int, work: Path, device: str, names: list[str]) -> dict[str, Any]:
    """FID of fmnist-ddim's fp, real and simulated W8A8 INT8 MoDiff (the simulator under bf16 autocast and in
    IEEE float32) from the same seeds, each with its bootstrap interval; the paired-bootstrap FID difference of
    each pair in `FID_PAIRS` (the same resample indices), and the mean per-seed relative L2 between their images."""
    from modiff.metrics.bootstrap import BootstrapConfig, paired_difference
    from modiff.metrics.compare import relative_l2
    from modiff.pipelines.evaluate import evaluate, seed_images
    from modiff.pipelines.summary import run_scores

    seeds, bootstrap = range(samples), BootstrapConfig()
    out: dict[str, Any] = {"samples": samples, "steps": steps, "bootstrap": dataclasses.asdict(bootstrap),
                           "runs": {}, "pairs": {}}
    scores, images = {}, {}
    for name, (preset, precision) in [(n, FID_RUNS[n]) for n in names]:
        try:
            run = work / f"fid-{name}"
            evaluate(md.load_model("fmnist-ddim"), seeds, run, SampleConfig(steps=steps, precision=precision),
                     quant_preset=preset, metrics=("fid",), batch_size=batch, device=device, progress=False)
            scores[name] = run_scores(run, seeds, "fmnist-train", bootstrap, device=device)
            images[name] = seed_images(run, seeds).astype(np.float64)
            out["runs"][name] = {"preset": preset, "precision": precision, **scores[name].metrics}
        except Exception as err:  # noqa: BLE001 - one run's failure must not lose the others
            out["runs"][name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        print(json.dumps({name: out["runs"][name]}, default=str), flush=True)
    for a, b in FID_PAIRS:
        if a in scores and b in scores:
            fid_a, fid_b = scores[a].metrics["fid"], scores[b].metrics["fid"]
            out["pairs"][f"{a} - {b}"] = {
                **paired_difference(fid_a, fid_b, scores[a].fid_resamples, scores[b].fid_resamples),
                "rel_l2_images_mean": float(relative_l2(images[a], images[b]).mean())}
    print(json.dumps({"pairs": out["pairs"]}), flush=True)
    return out


def _write(path: Optional[str], result: dict[str, Any]) -> None:
    if path:
        write_json(result, Path(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", default="cifar10,fmnist-ddim")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, or 'none'")
    parser.add_argument("--batch-sizes", default="512,64")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--error-batch", type=int, default=16, help="batch of the per-step error runs (0: skip)")
    parser.add_argument("--error-formats", default=",".join(ERROR_FORMATS), help="comma-separated formats of the error runs")
    parser.add_argument("--fid", type=int, default=0, help="samples of each FID run, fp, real and simulated (0: skip)")
    parser.add_argument("--fid-batch", type=int, default=512)
    parser.add_argument("--fid-runs", default=",".join(FID_RUNS), help="comma-separated runs of --fid (pairs need both)")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; no new row starts after")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    variants = [] if args.variants == "none" else args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    fid_runs = args.fid_runs.split(",")
    if [r for r in fid_runs if r not in FID_RUNS]:
        parser.error(f"unknown --fid-runs {[r for r in fid_runs if r not in FID_RUNS]}; known: {', '.join(FID_RUNS)}")
    error_formats = args.error_formats.split(",")
    if [f for f in error_formats if f not in ERROR_FORMATS]:
        parser.error(f"unknown --error-formats {[f for f in error_formats if f not in ERROR_FORMATS]}; "
                     f"known: {', '.join(ERROR_FORMATS)}")
    device = torch.device(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "triton": importlib.util.find_spec("triton") is not None, "args": vars(args), "rows": []}
    try:
        import torchao
        result["torchao"] = torchao.__version__
    except Exception as err:  # noqa: BLE001 - any import failure means: no torchao rows
        result["torchao"] = f"not importable: {type(err).__name__}: {err}"
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if args.error_batch:  # first: cheap (eager), and the quality half of the question
        def keep(errors: dict[str, Any]) -> None:
            result["errors"] = errors
            _write(args.out, result)

        _errors(args.archs.split(",")[0], args.error_batch, args.steps, device, error_formats, keep)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for arch in args.archs.split(","):
            for variant in variants:
                row: dict[str, Any] = {"arch": arch, "variant": variant, "batch": batch, "steps": args.steps}
                if time.perf_counter() - started > args.budget:
                    row["skipped"] = f"time budget of {args.budget} s spent"
                elif variant.startswith("torchao-") and result["torchao"].startswith("not importable"):
                    row["skipped"] = result["torchao"]
                else:
                    try:
                        model, notes = _build(arch, variant)
                        row.update(notes)
                        ran = backend_record(model, device)  # what computes the layers here, not the name
                        row["backend"] = ran["runs"] if ran else ("torchao" if variant.startswith("torchao") else "fp")
                        row.update(_time_row(model, FAST if device.type == "cuda" else EAGER, batch, args, device))
                    except Exception as err:  # noqa: BLE001 - one variant's failure must not lose the others
                        row["error"] = f"{type(err).__name__}: {err}"
                        row["traceback"] = traceback.format_exc()[-3000:]
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                result["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("profile", "traceback")}), flush=True)
                if "profile" in row:
                    print(row["profile"], flush=True)
                _write(args.out, result)
    if args.fid:
        with tempfile.TemporaryDirectory(prefix="bench-real-fid-") as work:
            result["fid"] = _fid(args.fid, args.fid_batch, args.steps, Path(work), args.device, fid_runs)
        _write(args.out, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _write(args.out, result)


if __name__ == "__main__":
    main()
