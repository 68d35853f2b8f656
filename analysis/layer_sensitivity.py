"""Which layers break round-to-nearest W4: a preset applied to all layers, to the first or the last
convolution alone, or to every layer but those two.

The first and last convolutions are the first and last Conv2d in module order (``net.conv_in`` and
``net.conv_out`` of the DDIM UNet, ``net.input_blocks.0.0`` and ``net.out.2`` of the CompVis UNet). Each
variant samples from the same noise as full precision (DDIM, the model's timesteps); the distance is the
per-seed relative L2 of the images (decoded for a latent model) to the fp images, averaged over seeds with a
95% bootstrap interval (`analysis.intervals`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import pandas as pd
import torch
from torch import nn

import modiff as md
from analysis.experiments import _on_device, _timesteps, analysis_precision
from analysis.intervals import summarize
from modiff.pipelines.execution import float32_precision
from modiff.utils.device import resolve_device
from modiff.utils.selection import network_modules
from modiff.quant import QuantConfig

__all__ = ["edge_convolutions", "layer_variants", "layer_sensitivity", "finding"]


def edge_convolutions(model: nn.Module) -> tuple[str, str]:
    """Qualified names of the first and the last Conv2d of ``model``'s network, in module order (what
    quantization touches: a latent model's first stage is not part of it)."""
    convs = [name for name, m in network_modules(model) if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        raise ValueError(f"the model has {len(convs)} Conv2d layers; layer_sensitivity needs at least 2")
    return convs[0], convs[-1]


def layer_variants(model: nn.Module, config: QuantConfig) -> dict[str, QuantConfig]:
    """``config`` on all its layers, on the first or the last convolution only, and on all but those two."""
    first, last = edge_convolutions(model)
    return {"all layers": config,
            f"{last} only": replace(config, include=(last,)),
            f"{first} only": replace(config, include=(first,)),
            f"all but {first} and {last}": replace(config, exclude=(*config.exclude, first, last))}


def _images(model: nn.Module, x_T: torch.Tensor, ts: Sequence[int]) -> torch.Tensor:
    with md.trajectory(model), float32_precision("fp32"):  # trajectory: nothing to do without MoDiff state
        return md.to_images(model, md.sample_ddim(model, x_T, ts)).flatten(1).double()


@torch.no_grad()
def layer_sensitivity(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], steps: int,
                      device: str = "cpu", batch_size: int = 64) -> pd.DataFrame:
    """Per preset and variant (`layer_variants`): relative L2 to fp over seeds, mean with a 95% interval,
    sampled in IEEE float32 (TF32 off on CUDA); columns preset, layers, rel_l2_pixels, ci95_low, ci95_high, n,
    precision."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    runner, seeds, ts = _on_device(model, device), list(seeds), _timesteps(model, steps)
    variants = {(p, name): config for p in presets for name, config in layer_variants(runner, md.presets[p]).items()}
    quantized = {key: md.quantize(runner, config) for key, config in variants.items()}
    rows = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        x_T = md.noise(chunk, model.sample_shape).to(resolve_device(device))
        reference = _images(runner, x_T, ts)
        for (preset, name), qmodel in quantized.items():
            out = _images(qmodel, x_T, ts)
            rel = ((out - reference).norm(dim=1) / reference.norm(dim=1)).cpu().numpy()
            rows += [{"preset": preset, "layers": name, "seed": s, "rel_l2_pixels": float(v)} for s, v in zip(chunk, rel)]
    table = summarize(pd.DataFrame(rows), ["preset", "layers"], "rel_l2_pixels")
    return table.rename(columns={"mean": "rel_l2_pixels"}).assign(precision=analysis_precision(device))


def finding(table: pd.DataFrame) -> str:
    """Markdown from a `layer_sensitivity` table: per preset, the error with every layer quantized and the
    layer group whose quantization alone comes closest to it."""
    lines = []
    for preset, part in table.groupby("preset", sort=False):
        whole = part[part["layers"] == "all layers"].iloc[0]
        groups = part[part["layers"] != "all layers"].sort_values("rel_l2_pixels", ascending=False)
        worst = groups.iloc[0]
        lines.append(f"- `{preset}`: relative L2 to fp {_interval(whole)} with every layer quantized; "
                     + "; ".join(f"{r['layers']} {_interval(r)}" for _, r in groups.iterrows())
                     + f" (n = {int(whole['n'])} seeds). The largest error comes from {worst['layers']}"
                     + (", as large as with every layer: that group alone accounts for the whole error."
                        if worst["ci95_high"] >= whole["ci95_low"] else "."))
    return "\n".join(lines)


def _interval(row: pd.Series) -> str:
    return f"{row['rel_l2_pixels']:.3g} [{row['ci95_low']:.3g}, {row['ci95_high']:.3g}]"
