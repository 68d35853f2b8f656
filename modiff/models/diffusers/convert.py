"""The official DDIM UNet (`DDIMUNet`, e.g. fmnist-ddim) as a diffusers `UNet2DModel`, and its export.

The two are one architecture (the DDPM UNet) under other names: the diffusers config below reproduces
its forward pass (sinusoidal embedding sin-then-cos with freq_shift 1, GroupNorm eps 1e-6, single-head
attention, (0, 1, 0, 1) padding before the stride-2 conv, nearest upsampling then a conv), and the
weights move by name; the attention's 1x1 q/k/v/proj_out convolutions become Linear weights. Outputs
agree to float rounding (a 1x1 conv and a Linear sum in different orders).

==================================  ==================================================
DDIMUNet                            UNet2DModel
==================================  ==================================================
temb.dense.{0,1}                    time_embedding.linear_{1,2}
down.{l}.block.{i}.<resnet>         down_blocks.{l}.resnets.{i}.<resnet>
down.{l}.attn.{i}.<attention>       down_blocks.{l}.attentions.{i}.<attention>
down.{l}.downsample.conv            down_blocks.{l}.downsamplers.0.conv
mid.block_1 / attn_1 / block_2      mid_block.resnets.0 / attentions.0 / resnets.1
up.{l}.block.{i} (and attn, ...)    up_blocks.{L-1-l}.resnets.{i} (up path reversed)
up.{l}.upsample.conv                up_blocks.{L-1-l}.upsamplers.0.conv
norm_out, conv_out                  conv_norm_out, conv_out
<resnet>: temb_proj, nin_shortcut   time_emb_proj, conv_shortcut (norm1/2, conv1/2 same)
<attention>: norm, q, k, v, proj_out  group_norm, to_q, to_k, to_v, to_out.0
==================================  ==================================================
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.denoisers import Denoiser

__all__ = ["ddim_unet_to_diffusers", "diffusers_unet_config", "export_diffusers", "diffusers_state_dict"]

_RESNET = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
        "norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def diffusers_unet_config(config: DDIMUNetConfig) -> dict[str, Any]:
    """The UNet2DModel keyword arguments of a DDIMUNet config (its DDPM-equivalent settings)."""
    if not config.resamp_with_conv:
        raise ValueError("UNet2DModel always resamples with a conv; resamp_with_conv=False has no equivalent")
    levels = len(config.ch_mult)
    attends = [config.image_size // 2**level in config.attn_resolutions for level in range(levels)]
    return {
        "sample_size": config.image_size, "in_channels": config.in_channels, "out_channels": config.out_ch,
        "block_out_channels": [config.ch * m for m in config.ch_mult], "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6, "downsample_padding": 0,
        "flip_sin_to_cos": False, "freq_shift": 1, "act_fn": "silu", "dropout": config.dropout,
        "time_embedding_type": "positional", "center_input_sample": False, "mid_block_scale_factor": 1,
    }


def _diffusers_key(key: str, levels: int) -> str:
    module, _, param = key.rpartition(".")
    for old, new in _TOP.items():
        if module == old:
            return f"{new}.{param}"
    mid = re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(.+)", module)
    if mid:
        return _layer(f"mid_block.{_MID[mid.group(1)]}", mid.group(2), param)
    path = re.fullmatch(r"(down|up)\.(\d+)\.(?:(block|attn)\.(\d+)\.(\w+)|(downsample|upsample)\.conv)", module)
    if not path:
        raise ValueError(f"DDIMUNet key {key!r} has no UNet2DModel counterpart")
    side, level, part, index, layer, resample = path.groups()
    block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{levels - 1 - int(level)}"
    if resample:
        return f"{block}.{resample}rs.0.conv.{param}"
    return _layer(f"{block}.{'resnets' if part == 'block' else 'attentions'}.{index}", layer, param)


def _layer(prefix: str, layer: str, param: str) -> str:
    table = _ATTENTION if "attentions" in prefix else _RESNET
    return f"{prefix}.{table.get(layer, layer)}.{param}"


def diffusers_state_dict(net: DDIMUNet) -> dict[str, torch.Tensor]:
    """The UNet2DModel state_dict of a DDIMUNet's weights (attention 1x1 conv weights as Linear)."""
    levels = len(net.config.ch_mult)
    state = {}
    for key, value in net.state_dict().items():
        new = _diffusers_key(key, levels)
        if ".attentions." in new and value.ndim == 4 and new.endswith("weight"):
            value = value[:, :, 0, 0]
        state[new] = value.detach().clone()
    return state


def ddim_unet_to_diffusers(net: DDIMUNet) -> nn.Module:
    """A diffusers UNet2DModel with the weights of `net`, loaded strictly (same outputs, see the module doc)."""
    from diffusers import UNet2DModel

    if not isinstance(net, DDIMUNet):
        raise TypeError(f"expected a DDIMUNet (the official DDIM layout), got {type(net).__name__}")
    unet = UNet2DModel(**diffusers_unet_config(net.config))
    unet.load_state_dict(diffusers_state_dict(net), strict=True)
    return unet.eval()


def _scheduler(model: Denoiser) -> Any:
    from diffusers import DDIMScheduler

    schedule = model.schedule
    final = schedule.final_alpha_bar
    if final not in (1.0, schedule.alpha_bar_at(0)):
        raise ValueError(f"final_alpha_bar {final} is neither 1 nor alpha_bar_0; DDIMScheduler has no equivalent")
    # trained_betas: the exact float32 betas, so alphas_cumprod equals the toolkit's alpha_bar bit for bit.
    return DDIMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.tolist(),
                         clip_sample=False, set_alpha_to_one=final == 1.0, steps_offset=0,
                         prediction_type="epsilon", timestep_spacing="leading")


def export_diffusers(model: Denoiser, out_dir: str | Path) -> Path:
    """Write `model` (a DDIMUNet Denoiser, e.g. fmnist-ddim) as a diffusers DDIMPipeline folder: unet/
    (UNet2DModel, safetensors), scheduler/ (DDIMScheduler with the model's betas), model_index.json.

    `modiff.load_model(out_dir)` and `diffusers.DDIMPipeline.from_pretrained(out_dir)` both read it.
    """
    from diffusers import DDIMPipeline

    net = getattr(model, "net", None)
    if not isinstance(net, DDIMUNet):
        raise ValueError(f"only pixel models with the official DDIM UNet export (e.g. fmnist-ddim); "
                         f"{getattr(model, 'name', type(model).__name__)} has a {type(net).__name__}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; export into a new folder")
    DDIMPipeline(unet=ddim_unet_to_diffusers(net), scheduler=_scheduler(model)).save_pretrained(out)
    return out
