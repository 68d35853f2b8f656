"""Tiny random diffusers networks and schedulers for the diffusers adapter tests (import after importorskip)."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DModel


def _seeded(seed: int, build: Any) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def tiny_unet2d(seed: int = 0) -> UNet2DModel:
    """A UNet2DModel on 3x8x8 images, with attention at the lower resolution."""
    return _seeded(seed, lambda: UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """A class-conditional DiT (10 classes, learned variance: 8 output channels) on 4x8x8 latents."""
    return _seeded(seed, lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10))


def ddim_scheduler(**overrides: Any) -> DDIMScheduler:
    """Stable Diffusion's DDIM settings (scaled-linear betas, steps_offset 1, final alpha_bar_0) unless overridden."""
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**{**config, **overrides})
