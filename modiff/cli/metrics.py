"""`modiff fid` and `modiff fid-ref`: sample quality against a reference set.

Registered on the `modiff` group by `modiff.cli.main`; kept apart so the main CLI module stays short.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from modiff.cli.options import USER_ERRORS, check_device_option

__all__ = ["fid_command", "fid_ref_command"]


@click.command("fid")
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


@click.command("fid-ref")
@click.option("--device", default="auto", show_default=True, callback=check_device_option)
def fid_ref_command(device: str) -> None:
    """Compute and cache the Fashion-MNIST reference statistics; print the floor (real against real).

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
