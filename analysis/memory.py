"""What the MoDiff state costs per image, under several accountings (Tables 6 and 19-21 of the paper).

Each modulated layer keeps, per sample, a_hat (shaped like its input) and o_hat (shaped like its output).
`modiff bops` counts both in fp32 for every modulated layer (``modiff_state_mb_per_image``). The paper
reports at most 4 MB extra at batch 1 on CIFAR-10 without saying what it counts, so `state_accounting`
lists the candidates side by side: both tensors in fp32 (a deployment that keeps o_hat), a_hat only
(o_hat = A(a_hat) + b recomputed, as the simulator does) in fp32 and in bf16, per layer and with one a_hat for
the layers that read one tensor (an attention block's q, k and v: what the simulator holds), and both stored as integer
codes at the activation bit width (ignoring that a_hat accumulates and so needs more bits than one
residual).
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

import modiff as md
from modiff.quant.cost import measure_macs
from modiff.quant.layers.trajectory import shared_input_pairs

__all__ = ["state_accounting", "cifar10_unet"]


def cifar10_unet() -> nn.Module:
    """A DDIM UNet of the official CIFAR-10 checkpoint's shape (ch 128, 3 channels in and out, random weights):
    the state's size depends only on the layer shapes, so the paper's model is counted without its weights."""
    from modiff.diffusion.schedules import linear_schedule
    from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
    from modiff.models.denoisers import Denoiser

    config = DDIMUNetConfig(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                            dropout=0.1, in_channels=3, resamp_with_conv=True, image_size=32)
    return Denoiser(DDIMUNet(config), linear_schedule(), "cifar10-size DDIM UNet", {})


def _state_numels(model: nn.Module, preset: str) -> tuple[int, int, int, int, int]:
    """Per image: number of stateful layers, a_hat and o_hat values summed over them, the a_hat values of the
    layers that read another's (`shared_input_pairs`: they keep no a_hat of their own), activation bits."""
    config = md.presets[preset]
    if not config.stateful:
        raise ValueError(f"preset {preset!r} keeps no MoDiff state (mode {config.mode!r}); pick a '-modiff' preset")
    qmodel = md.quantize(model, config)
    device = next(model.parameters()).device
    x = torch.zeros(1, *model.sample_shape, device=device)
    costs, _ = measure_macs(model, x, torch.full((1,), 500, device=device, dtype=torch.long))
    stateful = [c for c in costs if getattr(getattr(qmodel.get_submodule(c.name), "config", None), "stateful", False)]
    bits = 32 if config.activation is None else config.activation.spec.bits
    names = {id(m): n for n, m in qmodel.named_modules()}
    followers = {names[id(follower)] for follower, _ in shared_input_pairs(qmodel)}
    shared = sum(c.input_numel for c in stateful if c.name in followers)
    return len(stateful), sum(c.input_numel for c in stateful), sum(c.output_numel for c in stateful), shared, bits


def state_accounting(model: nn.Module, preset: str = "w8a4-modiff") -> pd.DataFrame:
    """One row per accounting (see the module docstring): model (its name), preset, accounting, layers,
    mb_per_image (1e6 bytes)."""
    layers, a_hat, o_hat, shared, bits = _state_numels(model, preset)
    rows = [("a_hat and o_hat, fp32 (`modiff bops`, the bops_memory table)", (a_hat + o_hat) * 4),
            ("a_hat only, fp32 (o_hat recomputed as A(a_hat) + b)", a_hat * 4),
            ("a_hat only, bf16, one per layer", a_hat * 2),
            ("a_hat only, bf16, one per input read by several layers (what the simulator holds)", (a_hat - shared) * 2),
            (f"a_hat and o_hat as {bits}-bit codes (a lower bound)", (a_hat + o_hat) * bits / 8)]
    name = str(getattr(model, "name", type(model).__name__))
    return pd.DataFrame([{"model": name, "preset": preset, "accounting": what, "layers": layers, "mb_per_image": size / 1e6}
                         for what, size in rows])
