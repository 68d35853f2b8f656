"""Published configs of real diffusers models, for building them without weights (on the meta device).

`SD15_UNET` is the UNet2DConditionModel config of Stable Diffusion v1.5 (unet/config.json of the
published pipeline; the v1.x UNets share it): 859,520,964 parameters, 4x64x64 latents (512x512 images),
text context 77 tokens x 768. `SD15_SCHEDULER` is its noise schedule ("scaled_linear" betas), given to
the toolkit's DDIMScheduler-based schedule.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SD15_UNET", "SD15_SCHEDULER", "SD15_CONTEXT", "sd15_unet_on_meta"]

SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
}
SD15_CONTEXT = (77, 768)  # CLIP ViT-L/14 text tokens x width


def sd15_unet_on_meta() -> nn.Module:
    """Stable Diffusion v1.5's UNet2DConditionModel on the meta device: shapes only, no memory, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET).eval()
