"""`modiff sample`, `modiff evaluate` and `modiff record`: sampling runs of one model into a folder.

Registered on the `modiff` group by `modiff.cli.main`; kept apart so the main CLI module stays short.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from modiff.diffusion.schedules import Spacing
from modiff.cli.options import (BATCH_SIZE, USER_ERRORS, check_device_option, execution_options, literal_choices,
                                load_model_option, parse_seeds_option, precision_option)
from modiff.cli.summaries import fidelity_lines, samples_on_disk
from modiff.pipelines.generate import SampleConfig, SamplerName

__all__ = ["sample", "evaluate", "record_command"]

SPACING_HELP = "Timestep spacing [default: the model's: uniform for pixel models, ldm for latent models]."


@click.command()
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name or official .ckpt file.")
@click.option("--config", "model_config", type=click.Path(exists=True, dir_okay=False), help="YAML config of a .ckpt.")
@click.option("--sampler", type=literal_choices(SamplerName), default="ddim", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--spacing", type=literal_choices(Spacing), default=None, help=SPACING_HELP)
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
@click.option("--prompt", "prompt_texts", multiple=True, help="Prompt of a text-conditioned model (repeatable; "
                                                                "seed s gets prompt s mod N).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File of prompts, one per line (instead of --prompt).")
@click.option("--guidance", type=float, default=7.5, show_default=True,
              help="Classifier-free guidance scale of text-conditioned models (1: none).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
def sample(model: str, model_config: Optional[str], sampler: str, steps: int, spacing: Optional[str], eta: float,
           seeds: list[int], batch_size: int, precision: str, compile_net: Optional[bool], cuda_graphs: Optional[bool],
           device: str, quant_preset: Optional[str], quantized: Optional[Path], weights_from: Optional[Path],
           prompt_texts: tuple[str, ...], prompts_file: Optional[Path], guidance: float, out: Path) -> None:
    """Sample one PNG per seed into OUT (re-running resumes; seeds already on disk are skipped).

    Static presets (qdiff-*) and the -adaround presets use the model's shipped calibration. On a GPU the
    network runs the fast path (bf16 autocast, channels_last, torch.compile, CUDA graphs; no CUDA graphs for
    a diffusers network); --precision fp32, --no-compile and --no-cuda-graphs opt out.

    \b
    Examples:
      modiff sample --seeds 0-63 --out data/runs/fp
      modiff sample --preset w4a4-adaround-modiff --seeds 0-63 --out data/runs/w4a4-adaround-modiff
      modiff sample --preset qdiff-w4a4-modiff --model fmnist-ldm --out data/runs/ldm-qdiff-w4a4-modiff
      modiff sample --preset w4a4-modiff --sampler dpm-solver --steps 20 --seeds 0-9,100 --out data/runs/q
      modiff sample --preset w4a4-modiff --precision fp32 --no-compile --no-cuda-graphs --out data/runs/q-fp32
      modiff sample --model model-790000.ckpt --config cifar10.yml --spacing quad --out data/runs/cifar
      modiff sample --quantized data/quantized/qdiff-w4a4 --seeds 0-63 --out data/runs/qdiff-w4a4
      torchrun --nproc-per-node 2 -m modiff sample --seeds 0-9999 --batch-size 500 --out data/runs/fp-10k
      modiff sample --model path/to/sd-pipeline --prompts prompts.txt --preset w8a4-modiff --steps 50 --out data/runs/sd
    """
    from modiff.cli.calibrate import load_quantized_run
    from modiff.cli.diffusers import prompt_condition, read_prompts
    from modiff.pipelines.distributed import torchrun_session
    from modiff.utils.distributed import World
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
        condition, described = prompt_condition(net, read_prompts(prompt_texts, prompts_file), guidance)
        identity.update(described)
        if cuda_graphs and condition is not None:
            raise ValueError("--cuda-graphs replays networks called with tensors alone; a text-conditioned "
                             "diffusers network takes keywords: use --no-cuda-graphs")
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
        there = samples_on_disk(out, seeds)
        with torchrun_session(device) as rank_device:  # under torchrun: this rank's share of the batches
            done = generate(net, seeds, out, config, batch_size=batch_size, device=rank_device, identity=identity,
                            prepare=prepare, compile=compile_net, cuda_graphs=cuda_graphs,
                            condition=condition)
            leader = World.current().leader
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    if leader:
        click.echo(f"wrote {len(seeds) - there} new samples to {done}" + (f"; reused {there} already there" if there else ""))


@click.command()
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, exported folder, or .ckpt.")
@click.option("--preset", "quant_preset", default=None, help="Quantization preset (default: full precision).")
@click.option("--sampler", type=literal_choices(SamplerName), default="ddim", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--spacing", type=literal_choices(Spacing), default=None, help=SPACING_HELP)
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
      torchrun --nproc-per-node 4 -m modiff evaluate --preset w8a4-modiff --out data/runs/w8a4-modiff
    """
    import json

    from modiff.cli.diffusers import refuse_conditional
    from modiff.pipelines.distributed import torchrun_session
    from modiff.utils.distributed import World
    from modiff.pipelines.evaluate import evaluate as run_evaluation
    from modiff.models.conventions import default_spacing
    from modiff.quant import presets

    try:
        if quant_preset is not None:
            presets[quant_preset]  # a typo fails before any sampling
        net = load_model_option(model, None, takes_config=False)
        refuse_conditional(net, "evaluate")
        config = SampleConfig(sampler=sampler, steps=steps, spacing=spacing or default_spacing(net), precision=precision)
        with torchrun_session(device) as rank_device:  # under torchrun: ranks sample, rank 0 scores
            result = run_evaluation(net, seeds, out, config, quant_preset=quant_preset, ref=ref, fp_run=fp_run,
                                    batch_size=batch_size, device=rank_device, compile=compile_net,
                                    cuda_graphs=cuda_graphs)
            leader = World.current().leader
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    if not leader:
        return
    click.echo(json.dumps(result["metrics"], indent=1))
    if "fidelity_to_fp" in result:
        click.echo("\n".join(fidelity_lines(result["fidelity_to_fp"])))
    else:
        click.echo("per-seed PSNR and relative L2 to full precision: add --fp-run RUN (an fp run of these seeds)")
    click.echo(f"written to {out / 'metrics.json'}")


@click.command("record")
@click.option("--model", default="fmnist-ddim", show_default=True, help="Preset name, exported folder, or .ckpt.")
@click.option("--preset", "quant_preset", default=None, help="Quantization preset (default: full precision).")
@click.option("--sampler", type=literal_choices(SamplerName), default="ddim", show_default=True)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--spacing", type=literal_choices(Spacing), default=None, help=SPACING_HELP)
@click.option("--seeds", default="0-63", show_default=True, callback=parse_seeds_option, help="e.g. 0-63 or 0-9,100.")
@click.option("--sites", default="conv,linear", show_default=True,
              help="Site spec: types (conv, linear, all, type:Name) and name patterns (net.mid.*, !net.temb.*).")
@click.option("--tensors", "tensor_sites", default=None, help="Also keep full tensors of these sites (same grammar).")
@click.option("--batch-size", type=BATCH_SIZE, default=64, show_default=True)
@precision_option
@click.option("--device", default="auto", show_default=True, callback=check_device_option, help="auto (GPU when present), cpu, cuda, cuda:1.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="New recording directory.")
def record_command(model: str, quant_preset: Optional[str], sampler: str, steps: int, spacing: Optional[str],
                   seeds: list[int], sites: str,
                   tensor_sites: Optional[str], batch_size: int, precision: str, device: str, out: Path) -> None:
    """Record per-layer, per-step activation statistics (and optionally full tensors) of sampling runs into OUT.

    On a GPU in bf16 autocast (--precision fp32 opts out); the network runs eagerly, so that the recorder's
    hooks see every layer call.

    \b
    Examples:
      modiff record --steps 100 --seeds 0-63 --out data/recordings/fp
      modiff record --steps 100 --spacing quad --seeds 0-63 --out data/recordings/fp-quad
      modiff record --preset w8a4-modiff --sites 'net.mid.*' --tensors net.mid.block_1.conv1 --out data/recordings/q
      modiff record --sites 'conv,!net.up.*' --sampler dpm-solver --steps 20 --seeds 0-7 --device cpu --out /tmp/rec
    """
    from modiff.cli.diffusers import refuse_conditional
    from modiff.models.conventions import default_spacing
    from modiff.quant import presets, quantize, trajectory
    from modiff.pipelines.record import record_sampling
    from modiff.record.tensors import TensorSpec

    try:
        quant = None if quant_preset is None else presets[quant_preset]  # a typo fails before loading
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} is not empty; a recording needs a new directory (use another --out)")
        net = load_model_option(model, None, takes_config=False)
        refuse_conditional(net, "record")
        config = SampleConfig(sampler=sampler, steps=steps, spacing=spacing or default_spacing(net), precision=precision)
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
