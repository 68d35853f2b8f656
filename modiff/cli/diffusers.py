"""diffusers on the command line: `modiff export-diffusers`, and the prompts of `modiff sample`.

Registered on the `modiff` group by `modiff.cli.main`; kept apart so the main CLI module stays short.
A text-conditioned model samples seed s with prompt s mod N of its N prompts (``--prompt`` repeated, or
``--prompts FILE``, one per line): a seed's image depends on its seed and its prompt only, so runs
resume and shard by seed as for unconditional models.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import click

from modiff.cli.options import USER_ERRORS, load_model_option

__all__ = ["export_diffusers_command", "read_prompts", "prompt_condition", "refuse_conditional"]


def read_prompts(prompt: Sequence[str], prompts_file: Optional[Path]) -> Optional[list[str]]:
    """The prompts of ``--prompt`` (repeatable) or ``--prompts FILE`` (one per line, blank lines skipped)."""
    if prompt and prompts_file is not None:
        raise click.UsageError("give --prompt or --prompts FILE, not both")
    if prompts_file is None:
        return list(prompt) or None
    lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise click.UsageError(f"--prompts {prompts_file} holds no prompt (one per line)")
    return prompts


def prompt_condition(net: Any, prompts: Optional[list[str]], guidance: float) -> tuple[Any, dict[str, Any]]:
    """(the `generate` condition of the batch's seeds, or None; what the run identity records)."""
    text = getattr(net, "conditioning", None) == "text"
    if prompts is None:
        if text:
            raise click.UsageError(f"{net.name} is text-conditioned: give --prompt TEXT or --prompts FILE")
        if getattr(net, "requires_condition", False):
            raise click.UsageError(f"{net.name} is class-conditional; sample it from Python with "
                                   f"model.conditioned(class_labels=...)")
        return None, {}
    if not text:
        raise click.UsageError(f"--prompt/--prompts apply to text-conditioned models; {getattr(net, 'name', net)} is not")
    if guidance < 1:
        raise click.BadParameter(f"must be >= 1 (1: no guidance), got {guidance}", param_hint="--guidance")

    def condition(model: Any, seeds: Sequence[int]) -> Any:
        return model.conditioned([prompts[s % len(prompts)] for s in seeds], guidance_scale=guidance)

    return condition, {"prompts": prompts, "guidance_scale": guidance}


def refuse_conditional(net: Any, command: str) -> None:
    """A usage error for commands that take no prompts or labels, on a conditional model."""
    if getattr(net, "requires_condition", False):
        raise click.UsageError(f"`modiff {command}` takes no prompts or class labels, which {net.name} needs; run it "
                               f"from Python inside `with model.conditioned(...)`, or use `modiff sample --prompt`")


@click.command("export-diffusers")
@click.option("--model", default="fmnist-ddim", show_default=True,
              help="A model with the official DDIM UNet: preset, folder, or .ckpt with --config.")
@click.option("--config", "model_config", type=click.Path(exists=True, dir_okay=False), help="YAML config of a .ckpt.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New folder.")
def export_diffusers_command(model: str, model_config: Optional[str], out: Path) -> None:
    """Write a DDIM-UNet model as a diffusers DDIMPipeline folder (UNet2DModel + DDIMScheduler).

    The UNet2DModel computes the same eps (to float rounding) and the scheduler has the model's betas,
    so `modiff sample --model OUT` and diffusers' DDIMPipeline.from_pretrained(OUT) both run it.

    \b
    Examples:
      modiff export-diffusers --out data/fmnist-ddim-diffusers
      modiff sample --model data/fmnist-ddim-diffusers --steps 100 --seeds 0-63 --out data/runs/fp-diffusers
    """
    from modiff.models.diffusers.convert import export_diffusers

    try:
        done = export_diffusers(load_model_option(model, model_config), out)
    except (*USER_ERRORS, ImportError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote the diffusers pipeline folder {done}")
