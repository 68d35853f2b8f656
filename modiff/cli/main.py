"""The `modiff` command: parse, build a config, call the library, write a run directory.

The group and its small commands live here; the others are registered from their own modules.
"""
from __future__ import annotations

import logging
from typing import Optional

import click

from modiff.cli.options import USER_ERRORS, load_model_option

__all__ = ["main"]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """modiff: quantized diffusion models, MoDiff and Q-Diffusion, measured end to end."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


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
    import contextlib
    import json

    from modiff.quant import presets
    from modiff.quant.cost import preset_report

    try:
        quant = presets[quant_preset]
        net = load_model_option(model, model_config)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    with getattr(net, "placeholder_condition", contextlib.nullcontext)():  # a conditional model's batch-1 condition
        report = preset_report(net, quant, steps)
    if not per_layer:
        report.pop("layers")
    click.echo(json.dumps(report, indent=1))


def _register_commands() -> None:
    from modiff.cli.calibrate import calibrate_command, calibrate_data_command, calibrate_shipped_command
    from modiff.cli.diffusers import export_diffusers_command
    from modiff.cli.metrics import fid_command, fid_ref_command
    from modiff.cli.reports import report_diff_command, reproduce
    from modiff.cli.sampling import evaluate, record_command, sample
    from modiff.cli.summarize import image_diff_command, summarize_command
    from modiff.cli.training import train

    main.add_command(sample)
    main.add_command(evaluate)
    main.add_command(record_command)
    main.add_command(train)
    main.add_command(fid_command)
    main.add_command(fid_ref_command)
    main.add_command(reproduce)
    main.add_command(report_diff_command)
    main.add_command(calibrate_data_command)
    main.add_command(calibrate_command)
    main.add_command(calibrate_shipped_command)
    main.add_command(export_diffusers_command)
    main.add_command(summarize_command)
    main.add_command(image_diff_command)


_register_commands()
