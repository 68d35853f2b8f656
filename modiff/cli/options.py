"""Options shared by the `modiff` commands, checked where click parses them, and model loading with
errors in command-line words (``--config``, not ``config=``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, get_args

import click

from modiff.pipelines.execution import PrecisionChoice

__all__ = ["USER_ERRORS", "BATCH_SIZE", "literal_choices", "parse_seeds_option", "check_device_option",
           "load_model_option", "precision_option", "execution_options"]

Command = TypeVar("Command", bound=Callable[..., Any])

# What the library raises for a user's mistake or a damaged or full disk: one line, no traceback.
USER_ERRORS = (ValueError, OSError, KeyError, TypeError)
BATCH_SIZE = click.IntRange(min=1)
CHECKPOINTS = (".ckpt", ".pt", ".pth", ".safetensors")


def literal_choices(literal: object) -> click.Choice:
    """The values of a ``Literal`` type (a sampler, a spacing, a precision) as a click choice."""
    return click.Choice(list(get_args(literal)))


def parse_seeds_option(_ctx: click.Context, _param: click.Parameter, value: str) -> list[int]:
    from modiff.utils.rng import parse_seeds

    try:
        return parse_seeds(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err


def check_device_option(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The --device value as given, once `resolve_device` accepts it (gpu0, cuda without CUDA: usage errors)."""
    from modiff.utils.device import resolve_device

    try:
        resolve_device(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    return value


def load_model_option(model: str, config: Optional[str], takes_config: bool = True) -> Any:
    """`load_model(model, config)` for --model and --config, refusing in command-line words what the
    library would refuse in Python words."""
    from modiff.models.registry import MODEL_PRESETS, load_model

    from modiff.models.diffusers.loading import is_diffusers_folder

    path = Path(model)
    kinds = (f"a preset ({', '.join(sorted(MODEL_PRESETS))}), a folder exported by `modiff train`, a diffusers "
             f"folder (model_index.json or config.json)"
             + (f", or a checkpoint file ({', '.join(CHECKPOINTS)}) with --config FILE" if takes_config else ""))
    if model in MODEL_PRESETS:
        if config is not None:
            raise click.UsageError(f"--model {model} is a preset and brings its own config: drop --config")
    elif path.is_dir():
        diffusers = _diffusers_folder(path, is_diffusers_folder)
        if diffusers and config is not None:
            raise click.UsageError(f"--model {model} is a diffusers folder and brings its own config: drop --config")
        if not diffusers and not (path / "config.yaml").is_file():
            raise click.ClickException(f"--model {model} is a folder without config.yaml; use {kinds}")
    elif path.suffix in CHECKPOINTS:
        if not takes_config:
            raise click.UsageError(f"this command takes {kinds}; sample a checkpoint with "
                                   f"`modiff sample --model {model} --config FILE`")
        if not path.is_file():
            raise click.ClickException(f"--model {model}: no such file")
        if config is None:
            raise click.UsageError(f"--model {model} is a checkpoint: give its YAML config with --config FILE")
    else:
        raise click.ClickException(f"unknown --model {model!r}: use {kinds}")
    try:
        return load_model(model, config=config)
    except (*USER_ERRORS, ImportError) as err:  # ImportError: a diffusers folder without diffusers installed
        raise click.ClickException(str(err)) from err


def _diffusers_folder(path: Path, is_diffusers_folder: Any) -> bool:
    try:
        return bool(is_diffusers_folder(path))
    except ValueError as err:  # an unreadable config.json
        raise click.ClickException(str(err)) from err


PRECISION_HELP = ("auto: bf16 autocast on a GPU, fp32 on the CPU; fp32: IEEE float32 (TF32 off on a GPU); tf32: TF32 "
                  "matmuls and convolutions; bf16: autocast.")


def precision_option(command: Command) -> Command:
    """``--precision`` (auto, fp32, tf32, bf16) as the ``precision`` argument."""
    return click.option("--precision", type=click.Choice(list(get_args(PrecisionChoice))), default="auto",
                        show_default=True, help=PRECISION_HELP)(command)


def execution_options(command: Command) -> Command:
    """``--precision``, ``--compile/--no-compile`` and ``--cuda-graphs/--no-cuda-graphs`` as the ``precision``,
    ``compile_net`` and ``cuda_graphs`` arguments (None: the device's default, `modiff.pipelines.execution`)."""
    command = click.option("--cuda-graphs/--no-cuda-graphs", "cuda_graphs", default=None,
                           help="Replay each sampling step as one CUDA graph [default: on a GPU].")(command)
    command = click.option("--compile/--no-compile", "compile_net", default=None,
                           help="torch.compile the network [default: on a GPU].")(command)
    return precision_option(command)
