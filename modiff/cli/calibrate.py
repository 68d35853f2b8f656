"""`modiff calibrate-data` and `modiff calibrate`: Q-Diffusion calibration from the command line.

Registered on the `modiff` group by `modiff.cli`; kept apart so the main CLI module stays short.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional, get_args

import click

from modiff.cli.options import USER_ERRORS, check_device_option, execution_options, load_model_option
from modiff.diffusion.schedules import Spacing

__all__ = ["calibrate_data_command", "calibrate_command", "calibrate_shipped_command", "apply_overrides",
           "load_quantized_run"]


def _parse(raw: str, current: Any, key: str) -> Any:
    """``raw`` read as the type of the current value (bool, int, float, str)."""
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {key}: expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(raw)
            except ValueError as err:
                raise ValueError(f"--set {key}: expected a {kind.__name__}, got {raw!r}") from err
    return raw


def apply_overrides(recipe: Any, items: tuple[str, ...]) -> Any:
    """``section.field=value`` (or ``field=value``) overrides of a CalibrationConfig, validated.

    ``weights=none`` turns AdaRound off (weights rounded to nearest).
    """
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value (for example adaround.iters=2000), got {item!r}")
        path = key.split(".")
        path = ["weights" if p == "adaround" else p for p in path]
        if path == ["weights"] and raw.lower() == "none":
            recipe = replace(recipe, weights=None)
            continue
        recipe = _replace_path(recipe, path, raw, key)
    return recipe


def _replace_path(obj: Any, path: list[str], raw: str, key: str) -> Any:
    names = [f.name for f in fields(obj)]
    if path[0] not in names:
        raise ValueError(f"--set {key}: unknown key {path[0]!r}; allowed: {', '.join(names)}")
    current = getattr(obj, path[0])
    if len(path) == 1:
        if is_dataclass(current):
            raise ValueError(f"--set {key}: {path[0]!r} is a section; set one of its fields, e.g. {path[0]}.iters=100")
        return replace(obj, **{path[0]: _parse(raw, current, key)})
    if current is None or not is_dataclass(current):
        raise ValueError(f"--set {key}: {path[0]!r} has no fields to set")
    return replace(obj, **{path[0]: _replace_path(current, path[1:], raw, key)})


@click.command("calibrate-data")
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, exported folder, or .ckpt.")
@click.option("--config", "model_config", type=click.Path(exists=True, dir_okay=False), help="YAML config of a .ckpt.")
@click.option("--steps", type=int, default=100, show_default=True, help="DDIM steps of the trajectories.")
@click.option("--spacing", type=click.Choice(list(get_args(Spacing))), default=None,
              help="Timestep spacing [default: the model's: uniform for pixel models, ldm for latent models].")
@click.option("--calib-steps", type=int, default=20, show_default=True, help="Steps kept, spread over the trajectory.")
@click.option("--samples-per-step", type=int, default=256, show_default=True, help="Trajectories (seeds 0..N-1).")
@execution_options
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New dataset folder.")
def calibrate_data_command(model: str, model_config: Optional[str], steps: int, spacing: Optional[str], calib_steps: int,
                           samples_per_step: int, precision: str, compile_net: Optional[bool], cuda_graphs: Optional[bool],
                           device: str, out: Path) -> None:
    """Collect time-step-aware calibration inputs (x_t, t) and their predecessors in one DDIM pass (on a GPU
    with the fast path, as `modiff sample`; the manifest's metadata records it).

    \b
    Examples:
      modiff calibrate-data --out data/calib/fmnist
      modiff calibrate-data --steps 100 --spacing quad --calib-steps 20 --samples-per-step 256 --out data/calib/q
      modiff calibrate-data --steps 10 --calib-steps 3 --samples-per-step 8 --device cpu --out /tmp/calib
    """
    from modiff.utils.device import resolve_device
    from modiff.models.conventions import default_spacing
    from modiff.pipelines.execution import precision_context, prepare_network, resolve_execution
    from modiff.quant.ptq.data import CalibDataConfig, collect_and_save, refuse_existing

    try:
        refuse_existing(out)  # before loading and sampling, not after
        dev = resolve_device(device)
        net = load_model_option(model, model_config)
        execution = resolve_execution(dev, precision, compile_net, cuda_graphs,
                                      keyword_net=getattr(net, "net_takes_keywords", False))
        net = prepare_network(net, dev, execution)
        config = CalibDataConfig(steps=steps, spacing=spacing or default_spacing(net), calib_steps=calib_steps,
                                 samples_per_step=samples_per_step)
        with precision_context(execution.precision, dev):
            done = collect_and_save(net, config, out, dev, metadata={"model": model, "config": model_config,
                                                                     "execution": execution.to_dict()})
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {calib_steps * samples_per_step} calibration inputs to {done}")


@click.command("calibrate")
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, exported folder, or .ckpt.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Dataset folder from `modiff calibrate-data`.")
@click.option("--preset", "quant_preset", required=True, help="Quantization preset, e.g. qdiff-w4a4 (see `modiff presets`).")
@click.option("--modiff", "modulated", is_flag=True, help="Use the preset's -modiff variant (modulated, MoDiff).")
@click.option("--samples-per-step", type=int, default=None, help="Use only the first N samples of every step.")
@click.option("--set", "overrides", multiple=True, help="Recipe override: adaround.iters=2000, activations.lr=1e-3, "
              "activations.learn=false, weights=none, adaround.cuda_graphs=false (repeatable).")
@click.option("--weights-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Reuse the AdaRound weights of a model saved by `modiff calibrate` with the same weight "
                   "quantization (e.g. qdiff-w4a4 for qdiff-w4a4 --modiff or qdiff-w4a8): only activations are calibrated.")
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New folder for the model.")
def calibrate_command(model: str, data_dir: Path, quant_preset: str, modulated: bool, samples_per_step: Optional[int],
                      overrides: tuple[str, ...], weights_from: Optional[Path], device: str, out: Path) -> None:
    """Calibrate a quantized model (AdaRound weights, static activation scales) and save it into OUT.

    Every finished unit is kept in OUT/progress: run the same command again after an interruption and
    it resumes there (the result equals an uninterrupted run's).

    \b
    Examples:
      modiff calibrate --data data/calib/fmnist --preset qdiff-w4a4 --out data/quantized/qdiff-w4a4
      modiff calibrate --data data/calib/fmnist --preset qdiff-w4a4 --modiff --samples-per-step 32 --out data/quantized/m
      modiff calibrate --data data/calib/fmnist --preset qdiff-w4a4 --modiff --weights-from data/quantized/qdiff-w4a4 --out data/quantized/qdiff-w4a4-modiff
      modiff calibrate --data /tmp/calib --preset w4a8 --set adaround.iters=200 --device cpu --out /tmp/w4a8
    """
    from modiff.utils.device import resolve_device
    from modiff.quant.ptq.data import load_calib_data
    from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate
    from modiff.quant.presets import presets
    from modiff.quant.ptq.saved import load_quantized, save_quantized

    try:
        name = f"{quant_preset}-modiff" if modulated else quant_preset
        config = presets[name]
        recipe = apply_overrides(CalibrationConfig(), overrides)
        if (out / "manifest.json").exists():
            raise ValueError(f"{out} already holds a saved model; choose a new --out")
        data = load_calib_data(data_dir, resolve_device(device))
        if samples_per_step is not None:
            data = data.subset(samples_per_step)
        data_model = json.loads((data_dir / "manifest.json").read_text()).get("metadata", {}).get("model")
        if data_model not in (None, model):
            raise ValueError(f"{data_dir} was sampled from model {data_model!r}, not {model!r}; use its data")
        net = load_model_option(model, None, takes_config=False)
        weights = None if weights_from is None else load_quantized(net, weights_from)
        if (out / "progress").is_dir():
            click.echo(f"resuming the calibration kept in {out / 'progress'}", err=True)
        qmodel, report = calibrate(net, config, data, recipe, weights=weights, checkpoints=out / "progress")
        metadata = {"model": model, "preset": name, "data": str(data_dir), "data_config": asdict(data.config),
                    "calibration": recipe.to_dict(), "report": report,
                    "weights_from": None if weights_from is None else str(weights_from)}
        save_quantized(qmodel, out, metadata)
        shutil.rmtree(out / "progress")
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"calibrated {name} in {report['seconds']} s; saved to {out}")
    if "adaround_vs_nearest" in report:
        summary = report["adaround_vs_nearest"]
        click.echo(f"AdaRound lowered the reconstruction loss of {summary['units_lowered']} of {summary['units']} units "
                   f"against round-to-nearest on the same grids (median loss ratio {summary['median_loss_ratio']:.3f})")
    if report.get("learned_vs_start"):
        click.echo(_learned_line(report["learned_vs_start"]))


def _learned_line(summary: dict[str, Any]) -> str:
    return (f"the learned step sizes lowered the loss of {summary['units_lowered']} of {summary['units']} units against "
            f"their observer start (median loss ratio {summary['median_loss_ratio']:.3f})")


@click.command("calibrate-shipped")
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name or exported model folder.")
@click.option("--preset", "quant_presets", multiple=True, default=("qdiff-w4a4", "qdiff-w4a4-modiff"), show_default=True,
              help="Static preset to calibrate (repeatable), or a shell pattern of them ('qdiff-*': all 20); its "
                   "AdaRound weights also serve the wXaY-adaround presets.")
@click.option("--steps", type=int, default=100, show_default=True, help="DDIM steps of the calibration trajectories.")
@click.option("--calib-steps", type=int, default=20, show_default=True, help="Steps kept, spread over the trajectory.")
@click.option("--samples-per-step", type=int, default=256, show_default=True,
              help="Trajectories (seeds FIRST_SEED..FIRST_SEED+N-1).")
@click.option("--first-seed", type=click.IntRange(min=0), default=1_000_000, show_default=True,
              help="First calibration seed: far from the seeds that evaluations sample (0..), so no table is "
                   "scored on its own calibration trajectories.")
@click.option("--spacing", type=click.Choice(list(get_args(Spacing))), default=None,
              help="Timestep spacing of the calibration trajectories [default: the model's].")
@click.option("--set", "overrides", multiple=True, help="Recipe override, as for `modiff calibrate`: adaround.iters=5000, "
              "activations.iters=1000 (repeatable).")
@click.option("--device", default="auto", show_default=True)
def calibrate_shipped_command(model: str, quant_presets: tuple[str, ...], steps: int, calib_steps: int,
                              samples_per_step: int, first_seed: int, spacing: Optional[str],
                              overrides: tuple[str, ...], device: str) -> None:
    """Calibrate static presets into the model folder's calibration/, which ships with the model.

    Collects calibration data (calibration/calib-data, not shipped), runs AdaRound (BRECQ blocks) once per
    weight quantization and learns the step sizes of every preset, as `modiff calibrate` does, then writes
    calibration/manifest.json (settings, iterations against the published 20k / 5k, sha256 of every file)
    and calibration/summary.json (AdaRound loss ratios per unit). Presets already there are kept. Under
    torchrun the AdaRound runs and then the presets are dealt over the ranks (gloo; ranks may share a GPU:
    `--device cuda` deals the GPUs there are, `--device cuda:0` puts every rank on it).

    \b
    Examples:
      modiff calibrate-shipped --model fmnist-ddim --preset 'qdiff-*' --spacing quad --set adaround.iters=5000 --set activations.iters=1000
      torchrun --nproc-per-node 4 -m modiff calibrate-shipped --model fmnist-ldm --preset 'qdiff-*' --device cuda --set adaround.iters=5000 --set activations.iters=1000
      modiff calibrate-shipped --model fmnist-ldm --preset qdiff-w4a8 --set adaround.iters=5000 --set activations.iters=1000
      modiff calibrate-shipped --model data/train/mine --samples-per-step 32 --set adaround.iters=200 --device cpu
    """
    import shlex

    from modiff.pipelines.distributed import torchrun_session
    from modiff.utils.distributed import World
    from modiff.pipelines.generate import resolve_device
    from modiff.models.conventions import default_spacing
    from modiff.models.registry import load_model
    from modiff.quant.ptq.data import CalibDataConfig
    from modiff.quant.ptq.calibrate import CalibrationConfig
    from modiff.quant.ptq.reuse import Calibration, calibrate_shipped
    from modiff.quant.presets import expand_static

    try:
        net = load_model(model)
        data = CalibDataConfig(steps=steps, spacing=spacing or default_spacing(net), calib_steps=calib_steps,
                               samples_per_step=samples_per_step, first_seed=first_seed)
        calibration = Calibration(data, apply_overrides(CalibrationConfig(), overrides))
        command = shlex.join(["modiff", "calibrate-shipped", "--model", model,
                              *(a for p in quant_presets for a in ("--preset", p)), "--steps", str(steps),
                              "--calib-steps", str(calib_steps), "--samples-per-step", str(samples_per_step),
                              "--first-seed", str(first_seed), *(("--spacing", spacing) if spacing else ()),
                              *(a for o in overrides for a in ("--set", o))])
        quant_presets = tuple(expand_static(quant_presets))
        with torchrun_session(device, coordinate_only=True) as rank_device:  # under torchrun: this rank's share
            root = calibrate_shipped(net, quant_presets, calibration, resolve_device(rank_device), command)
            leader = World.current().leader
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise click.ClickException(str(err)) from err
    if not leader:
        return
    summary = json.loads((root / "summary.json").read_text())
    for folder, adaround in summary["adaround"].items():
        click.echo(f"{folder}: AdaRound lowered the reconstruction loss of {adaround.get('units_lowered')} of "
                   f"{adaround.get('units')} units (median loss ratio {adaround.get('median_loss_ratio', float('nan')):.3f})")
    for preset, activations in summary["activations"].items():
        if "units_lowered" in activations:
            click.echo(f"{preset}: {_learned_line(activations)}")
    click.echo(f"shipped calibration of {', '.join(quant_presets)} written to {root}")


def load_quantized_run(model: str, model_config: Optional[str], run: Path) -> tuple[Any, dict[str, Any]]:
    """The model of a `modiff calibrate` folder, with its manifest; the model names must agree."""
    from modiff.quant.ptq.saved import load_quantized, read_manifest

    manifest = read_manifest(run)
    saved_model = manifest.get("metadata", {}).get("model")
    if saved_model not in (None, model):
        raise ValueError(f"{run} was calibrated for model {saved_model!r}; pass --model {saved_model}")
    return load_quantized(load_model_option(model, model_config), run), manifest

