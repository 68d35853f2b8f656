"""`modiff train ddim|ldm|classifier`: how the shipped weights were made.

Registered on the `modiff` group by `modiff.cli.main`; kept apart so the main CLI module stays short.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from modiff.cli.options import BATCH_SIZE, USER_ERRORS, check_device_option
from modiff.pipelines.generate import SampleConfig

__all__ = ["train"]


@click.group()
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
      modiff train ddim --out data/train/fmnist-ddim --iterations 25000   # how the shipped weights were made
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
                       SampleConfig(steps=100, spacing="ldm", precision="fp32"), device=dev, batch_size=100,
                       compile=False, cuda_graphs=False)
        shutil.copyfile(run / "grid.png", folder / "grid.png")
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"fmnist-ldm exported to {folder}; 10x10 grid (100 DDIM steps, ldm spacing) in {folder / 'grid.png'}")


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
