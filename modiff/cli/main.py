"""The `modiff` command: parse, build a config, call the library, write a run directory."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import click

from modiff.diffusion.schedules import Spacing
from modiff.cli.options import (BATCH_SIZE, USER_ERRORS, check_device_option, execution_options, load_model_option,
                                parse_seeds_option, precision_option)
from modiff.pipelines.generate import SampleConfig, SamplerName

__all__ = ["main"]


def _choices(literal: object) -> click.Choice:
    from typing import get_args

    return click.Choice(list(get_args(literal)))


SPACING_HELP = "Timestep spacing [default: the model's: uniform for pixel models, ldm for latent models]."


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """modiff: quantized diffusion models, MoDiff and Q-Diffusion, measured end to end."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name or official .ckpt file.")
@click.option("--config", "model_config", type=click.Path(exists=True, dir_okay=False), help="YAML config of a .ckpt.")
@click.option("--sampler", type=_choices(SamplerName), default="ddim", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--spacing", type=_choices(Spacing), default=None, help=SPACING_HELP)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM stochasticity (ddim only).")
@click.option("--seeds", default="0-63", show_default=True, callback=parse_seeds_option, help="e.g. 0-9999 or 0-9,100.")
@click.option("--batch-size", type=BATCH_SIZE, default=64, show_default=True)
@execution_options
@click.option("--device", default="auto", show_default=True, callback=check_device_option, help="auto (GPU when present), cpu, cuda, cuda:1.")
@click.option("--preset", "quant_preset", default=None, help="Quantization preset (see `modiff presets`).")
@click.option("--quantized", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A calibrated model saved by `modiff calibrate` (instead of --preset).")
@click.option("--weights-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="AdaRound weights for an -adaround --preset: a folder saved by `modiff calibrate` "
                   "[default: the model's shipped calibration].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
def sample(model: str, model_config: Optional[str], sampler: str, steps: int, spacing: Optional[str], eta: float,
           seeds: list[int], batch_size: int, precision: str, compile_net: Optional[bool], cuda_graphs: Optional[bool],
           device: str, quant_preset: Optional[str], quantized: Optional[Path], weights_from: Optional[Path],
           out: Path) -> None:
    """Sample one PNG per seed into OUT (re-running resumes; seeds already on disk are skipped).

    Static presets (qdiff-*) and the -adaround presets use the model's shipped calibration. On a GPU the
    network runs the fast path (bf16 autocast, channels_last, torch.compile, CUDA graphs); --precision fp32,
    --no-compile and --no-cuda-graphs opt out.

    \b
    Examples:
      modiff sample --seeds 0-63 --out data/runs/fp
      modiff sample --preset w4a4-adaround-modiff --seeds 0-63 --out data/runs/w4a4-adaround-modiff
      modiff sample --preset qdiff-w4a4-modiff --model fmnist-ldm --out data/runs/ldm-qdiff-w4a4-modiff
      modiff sample --preset w4a4-modiff --sampler dpm-solver --steps 20 --seeds 0-9,100 --out data/runs/q
      modiff sample --preset w4a4-modiff --precision fp32 --no-compile --no-cuda-graphs --out data/runs/q-fp32
      modiff sample --model model-790000.ckpt --config cifar10.yml --spacing quad --out data/runs/cifar
      modiff sample --quantized data/quantized/qdiff-w4a4 --seeds 0-63 --out data/runs/qdiff-w4a4
    """
    from modiff.cli.calibrate import load_quantized_run
    from modiff.pipelines.generate import generate
    from modiff.models.conventions import default_spacing
    from modiff.quant import presets, quantize, trajectory
    from modiff.quant.presets import calibration_hint, needs_calibration
    from modiff.quant.ptq.shipped import has_shipped, shipped_model

    try:
        quant = None if quant_preset is None else presets[quant_preset]  # a typo fails before loading
        if quant is not None and quantized is not None:
            raise ValueError("give either --preset or --quantized (a calibrated model carries its own config)")
        if weights_from is not None and (quant is None or not quant.adaround):
            raise ValueError("--weights-from gives AdaRound weights to an -adaround --preset (see `modiff presets`), "
                             f"got --preset {quant_preset}")
        identity: dict = {"model": model, "config": model_config, "quant_preset": quant_preset}
        prepare = None
        if quantized is not None:
            net, saved = load_quantized_run(model, model_config, quantized)
            identity.update(quantized=str(quantized), quant_config=saved["quant_config"])
            prepare = trajectory
        else:
            net = load_model_option(model, model_config)
        config = SampleConfig(sampler=sampler, steps=steps, spacing=spacing or default_spacing(net), eta=eta,
                              precision=precision)
        if quant is not None:
            if needs_calibration(quant) and not has_shipped(net, quant_preset):
                raise ValueError(calibration_hint(quant_preset))
            net = shipped_model(net, quant_preset) if needs_calibration(quant) else quantize(net, quant, weights=weights_from)
            identity["quant_config"] = quant.to_dict()
            if weights_from is not None:
                identity["weights_from"] = str(weights_from)
            prepare = trajectory
        done = generate(net, seeds, out, config, batch_size=batch_size, device=device, identity=identity,
                        prepare=prepare, compile=compile_net, cuda_graphs=cuda_graphs)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {len(seeds)} samples to {done}")


@main.command("presets")
def presets_command() -> None:
    """List the quantization presets as a table.

    \b
    Examples:
      modiff presets
      modiff presets | grep modiff
    """
    from modiff.quant import preset_table

    rows = preset_table()
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


@main.command()
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, folder, or .ckpt.")
@click.option("--config", "model_config", type=click.Path(exists=True, dir_okay=False), help="YAML config of a .ckpt.")
@click.option("--preset", "quant_preset", default="fp", show_default=True, help="Quantization preset.")
@click.option("--steps", type=int, default=100, show_default=True, help="Steps of one trajectory.")
@click.option("--per-layer", is_flag=True, help="Print every layer, not only the totals.")
def bops(model: str, model_config: Optional[str], quant_preset: str, steps: int, per_layer: bool) -> None:
    """MACs, BOPs (per step and per trajectory, per image) and MoDiff state memory.

    \b
    Examples:
      modiff bops --preset w8a4-modiff
      modiff bops --model model-790000.ckpt --config cifar10.yml --preset published-w8a3-modiff
      modiff bops --preset cache3 --steps 20 --per-layer
    """
    import json

    from modiff.quant import presets
    from modiff.quant.cost import preset_report

    try:
        quant = presets[quant_preset]
        net = load_model_option(model, model_config)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    report = preset_report(net, quant, steps)
    if not per_layer:
        report.pop("layers")
    click.echo(json.dumps(report, indent=1))


@main.group()
def train() -> None:
    """Train the embedded models (how the shipped weights were made)."""


@train.command("ddim")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Training directory (resumes).")
@click.option("--iterations", type=int, default=30_000, show_default=True)
@click.option("--batch-size", type=BATCH_SIZE, default=128, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the Fashion-MNIST idx files.")
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
@click.option("--no-compile", is_flag=True, help="Skip torch.compile.")
def train_ddim_command(out: Path, iterations: int, batch_size: int, data_dir: Optional[str], device: str, no_compile: bool) -> None:
    """Train fmnist-ddim: the DDIM CIFAR-10 UNet at ch 64 on Fashion-MNIST 32x32.

    \b
    Examples:
      modiff train ddim --out data/train/fmnist-ddim --iterations 30000
      modiff train ddim --out /tmp/smoke --iterations 50 --batch-size 8 --device cpu --no-compile
    """
    from modiff.pipelines.generate import generate
    from modiff.utils.device import resolve_device
    from modiff.models.registry import load_model
    from modiff.pipelines.train import DDIMTrainConfig, train_ddim

    try:
        config = DDIMTrainConfig(iterations=iterations, batch_size=batch_size, compile=not no_compile)
        dev = str(resolve_device(device))
        export = train_ddim(config, out, Path(data_dir) if data_dir else None, dev)
        generate(load_model(export), range(100), out / "samples-ddim100", SampleConfig(steps=100, precision="fp32"), device=dev,
                 batch_size=100, compile=False, cuda_graphs=False)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"EMA weights exported to {export}; 10x10 grid (100 DDIM steps) in {out / 'samples-ddim100'}")


@train.command("ldm")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder (exported weights; work/ holds the resumable checkpoints).")
@click.option("--ae-iterations", type=int, default=5000, show_default=True, help="Autoencoder iterations.")
@click.option("--unet-iterations", type=int, default=8000, show_default=True, help="Latent UNet iterations.")
@click.option("--ae-batch-size", type=BATCH_SIZE, default=256, show_default=True)
@click.option("--unet-batch-size", type=BATCH_SIZE, default=512, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the Fashion-MNIST idx files.")
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
@click.option("--no-compile", is_flag=True, help="Skip torch.compile.")
def train_ldm_command(out: Path, ae_iterations: int, unet_iterations: int, ae_batch_size: int, unet_batch_size: int,
                      data_dir: Optional[str], device: str, no_compile: bool) -> None:
    """Train fmnist-ldm: a KL-f4 autoencoder, then a latent UNet, on Fashion-MNIST 32x32 (resumes).

    \b
    Examples:
      modiff train ldm --out data/train/fmnist-ldm
      modiff train ldm --out /tmp/smoke --ae-iterations 20 --unet-iterations 20 --ae-batch-size 8 \\
          --unet-batch-size 8 --device cpu --no-compile
    """
    import shutil
    from dataclasses import replace

    from modiff.pipelines.generate import generate
    from modiff.utils.device import resolve_device
    from modiff.models.registry import load_model
    from modiff.pipelines.train_ldm import LDMTrainConfig, train_ldm

    try:
        default = LDMTrainConfig()
        config = LDMTrainConfig(
            autoencoder=replace(default.autoencoder, iterations=ae_iterations, batch_size=ae_batch_size),
            unet=replace(default.unet, iterations=unet_iterations, batch_size=unet_batch_size), compile=not no_compile)
        dev = str(resolve_device(device))
        folder = train_ldm(config, out, Path(data_dir) if data_dir else None, dev)
        run = generate(load_model(folder), range(100), folder / "work" / "samples-ddim100",
                       SampleConfig(steps=100, spacing="ldm", precision="fp32"), device=dev, batch_size=100, compile=False,
                       cuda_graphs=False)
        shutil.copyfile(run / "grid.png", folder / "grid.png")
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"fmnist-ldm exported to {folder}; 10x10 grid (100 DDIM steps, ldm spacing) in {folder / 'grid.png'}")


@main.command()
@click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: minutes on a CPU; paper: paper-scale sample counts (GPU).")
@click.option("--model", default="fmnist-ddim", show_default=True,
              help="A preset (fmnist-ddim, fmnist-ldm) or an exported folder; reports go to REPORTS/PRESET-MODEL.")
@click.option("--reports", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"), show_default=True)
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("data/runs"), show_default=True)
@click.option("--notebook", "--notebooks", "notebooks", multiple=True,
              help="Run only these notebooks (repeatable, or comma-separated).")
@click.option("--set", "overrides", multiple=True,
              help="Override a preset parameter: num_samples=8, analysis_samples=4, steps=50, calibrate=true, adaround_iters=5000 "
                   "(repeatable).")
def reproduce(preset: str, model: str, reports: Path, runs: Path, notebooks: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Run every notebook with papermill and write reports/PRESET/ (reports/PRESET-MODEL/ for another model
    than fmnist-ddim): the main job.

    \b
    Examples:
      modiff reproduce
      modiff reproduce --preset paper
      modiff reproduce --model fmnist-ldm --notebooks fig1b_activations,fig3_compensation,table1_bitwidth
      modiff reproduce --notebook model_card --reports /tmp/reports --set num_samples=8
    """
    from modiff.pipelines.reproduce import parse_override, report_name
    from modiff.pipelines.reproduce import reproduce as run_all

    try:
        parsed = dict(parse_override(item) for item in overrides)
        chosen = [name.strip() for item in notebooks for name in item.split(",") if name.strip()]
        results = run_all(preset, model, reports, runs, chosen or None, parsed)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    for r in results:
        click.echo(f"{'ok    ' if r.ok else 'FAILED'} {r.name} ({r.seconds} s){'' if r.ok else ': ' + r.error.splitlines()[-1]}")
    click.echo(f"index: {reports / report_name(preset, model) / 'index.html'}")
    if not all(r.ok for r in results):
        raise SystemExit(1)


@train.command("classifier")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/fmnist-classifier"), show_default=True)
@click.option("--epochs", type=int, default=8, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with the Fashion-MNIST idx files.")
def train_classifier_command(out: Path, epochs: int, data_dir: Optional[str]) -> None:
    """Train the Fashion-MNIST classifier whose features the metrics use (on the CPU).

    \b
    Examples:
      modiff train classifier
      modiff train classifier --epochs 2 --out /tmp/classifier
    """
    from modiff.metrics.classifier import ClassifierTrainConfig, train_classifier

    try:
        acc = train_classifier(ClassifierTrainConfig(epochs=epochs), out, Path(data_dir) if data_dir else None)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"test accuracy {acc:.4f}; weights in {out}")


@main.command("fid")
@click.argument("samples", type=click.Path(exists=True, path_type=Path))
@click.option("--ref", default="fmnist-train", show_default=True,
              help="fmnist-train, fmnist-test, an image folder, an .npz of uint8 images, or a statistics .npz.")
@click.option("--metrics", default="fid,isc,kid,prc", show_default=True, help="Comma-separated: fid, isc, kid, prc.")
@click.option("--extractor", type=click.Choice(["fmnist-classifier", "inception-v3-compat"]), default="fmnist-classifier", show_default=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Feature-extractor weights file.")
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
def fid_command(samples: Path, ref: str, metrics: str, extractor: str, weights: Optional[str], device: str) -> None:
    """Score SAMPLES (a run directory, an image folder or an .npz) and print the metrics as JSON.

    \b
    Examples:
      modiff fid data/runs/w4a4-modiff --ref fmnist-train
      modiff fid samples.npz --ref fmnist-test --metrics fid,kid
      modiff fid cifar_samples/ --ref cifar_train.npz --extractor inception-v3-compat --weights pt_inception.pth
    """
    import json

    from modiff.utils.device import resolve_device
    from modiff.metrics.fidelity import compute_metrics

    source = samples / "samples.npz" if (samples / "samples.npz").is_file() else samples
    try:
        result = compute_metrics(source, ref, [m.strip() for m in metrics.split(",")], extractor=extractor,
                                 device=str(resolve_device(device)), weights=weights, progress=True)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(result, indent=1))


@main.command("fid-ref")
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
def fid_ref_command(device: str) -> None:
    """Compute and cache the Fashion-MNIST reference statistics; print the test-vs-train floor.

    \b
    Examples:
      modiff fid-ref
      modiff fid-ref --device cpu
    """
    import json

    from modiff.utils.device import resolve_device
    from modiff.metrics.fidelity import cache_root, reference_floor
    from modiff.utils.runs import write_json

    try:
        floor = reference_floor(device=str(resolve_device(device)))
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    write_json(floor, cache_root() / "floor.json")
    click.echo(json.dumps(floor, indent=1))


@main.command()
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, exported folder, or .ckpt.")
@click.option("--preset", "quant_preset", default=None, help="Quantization preset (default: full precision).")
@click.option("--sampler", type=_choices(SamplerName), default="ddim", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--spacing", type=_choices(Spacing), default=None, help=SPACING_HELP)
@click.option("--seeds", default="0-9999", show_default=True, callback=parse_seeds_option)
@click.option("--ref", default="fmnist-train", show_default=True, help="Reference set (see `modiff fid --help`).")
@click.option("--fp-run", type=click.Path(exists=True, file_okay=False), help="Full-precision run of the same seeds.")
@click.option("--batch-size", type=BATCH_SIZE, default=256, show_default=True)
@execution_options
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def evaluate(model: str, quant_preset: Optional[str], sampler: str, steps: int, spacing: Optional[str], seeds: list[int],
             ref: str, fp_run: Optional[str], batch_size: int, precision: str, compile_net: Optional[bool],
             cuda_graphs: Optional[bool], device: str, out: Path) -> None:
    """Sample the seeds into OUT (resuming), score them, and write OUT/metrics.json (on a GPU with the fast
    path, as `modiff sample`).

    \b
    Examples:
      modiff evaluate --seeds 0-9999 --out data/runs/fp-10k
      modiff evaluate --preset w4a4-modiff --seeds 0-255 --fp-run data/runs/fp-10k --out data/runs/w4a4-modiff
      modiff evaluate --sampler dpm-solver --steps 20 --seeds 0-999 --ref fmnist-test --out data/runs/dpm20
    """
    import json

    from modiff.pipelines.evaluate import evaluate as run_evaluation
    from modiff.models.conventions import default_spacing
    from modiff.quant import presets

    try:
        if quant_preset is not None:
            presets[quant_preset]  # a typo fails before any sampling
        net = load_model_option(model, None, takes_config=False)
        config = SampleConfig(sampler=sampler, steps=steps, spacing=spacing or default_spacing(net), precision=precision)
        result = run_evaluation(net, seeds, out, config, quant_preset=quant_preset, ref=ref, fp_run=fp_run,
                                batch_size=batch_size, device=device, compile=compile_net, cuda_graphs=cuda_graphs)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(result["metrics"], indent=1))


@main.command("record")
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, exported folder, or .ckpt.")
@click.option("--preset", "quant_preset", default=None, help="Quantization preset (default: full precision).")
@click.option("--sampler", type=_choices(SamplerName), default="ddim", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--seeds", default="0-63", show_default=True, callback=parse_seeds_option, help="e.g. 0-63 or 0-9,100.")
@click.option("--sites", default="conv,linear", show_default=True,
              help="Site spec: types (conv, linear, all, type:Name) and name patterns (net.mid.*, !net.temb.*).")
@click.option("--tensors", "tensor_sites", default=None, help="Also keep full tensors of these sites (same grammar).")
@click.option("--batch-size", type=BATCH_SIZE, default=64, show_default=True)
@precision_option
@click.option("--device", default="auto", show_default=True, callback=check_device_option, help="auto (GPU when present), cpu, cuda, cuda:1.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New recording directory.")
def record_command(model: str, quant_preset: Optional[str], sampler: str, steps: int, seeds: list[int], sites: str,
                   tensor_sites: Optional[str], batch_size: int, precision: str, device: str, out: Path) -> None:
    """Record per-layer, per-step activation statistics (and optionally full tensors) of sampling runs into OUT.

    On a GPU in bf16 autocast (--precision fp32 opts out); the network runs eagerly, so that the recorder's
    hooks see every layer call.

    \b
    Examples:
      modiff record --steps 100 --seeds 0-63 --out data/recordings/fp
      modiff record --preset w8a4-modiff --sites 'net.mid.*' --tensors net.mid.block_1.conv1 --out data/recordings/q
      modiff record --sites 'conv,!net.up.*' --sampler dpm-solver --steps 20 --seeds 0-7 --device cpu --out /tmp/rec
    """
    from modiff.models.conventions import default_spacing
    from modiff.quant import presets, quantize, trajectory
    from modiff.pipelines.record import record_sampling
    from modiff.record.tensors import TensorSpec

    try:
        quant = None if quant_preset is None else presets[quant_preset]  # a typo fails before loading
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} is not empty; a recording needs a new directory (use another --out)")
        net = load_model_option(model, None, takes_config=False)
        config = SampleConfig(sampler=sampler, steps=steps, spacing=default_spacing(net), precision=precision)
        prepare = None
        if quant is not None:
            net = quantize(net, quant)
            prepare = trajectory
        done = record_sampling(net, seeds, out, config, sites=sites, batch_size=batch_size, device=device,
                               tensors=None if tensor_sites is None else TensorSpec(sites=tensor_sites),
                               prepare=prepare, metadata={"model": model, "quant_preset": quant_preset})
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"recorded {len(seeds)} samples x {steps} steps into {done}")


def _register_calibration() -> None:
    from modiff.cli.calibrate import calibrate_command, calibrate_data_command, calibrate_shipped_command

    main.add_command(calibrate_data_command)
    main.add_command(calibrate_command)
    main.add_command(calibrate_shipped_command)


_register_calibration()
