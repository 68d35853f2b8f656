"""Latent diffusion (CompVis LDM): a `Denoiser` on autoencoder latents, and its CompVis config/checkpoint form.

Notation: x an image in [-1, 1], z = scale_factor * E(x) its latent (E the first-stage encoder: the
posterior mode for a KL autoencoder, the pre-quantization features for a VQ one), D the decoder. The
sampler runs on z with the denoiser `net` (the latent UNet); images are D(z / scale_factor).

Only `net` is the denoising network: quantization, recording and BOP counting see `network_modules()`,
so the first stage stays in full precision, as in the published LDM results.

A CompVis config is recognised by `model.target` ending in "LatentDiffusion"; its `params` give the UNet
(`unet_config.params`), the first stage (`first_stage_config`: AutoencoderKL or VQModel[Interface]), the
schedule (`linear_start`, `linear_end`, `timesteps`; "linear" there means linear in sqrt(beta)) and the
latent shape (`channels`, `image_size`). Conditional models are not supported.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from modiff.diffusion.schedules import NoiseSchedule, sqrt_linear_schedule
from modiff.models.ldm import (
    EMA_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    LDMInfo,
    compvis_scale_factor,
    compvis_state_dict_split,
    ldm_modules_from_config,
)
from modiff.models.checkpoints import load_state_dict_strict
from modiff.models.denoisers import LatentDenoiser

__all__ = ["is_compvis_ldm_config", "latent_denoiser_from_compvis", "compvis_schedule", "compvis_module"]

log = logging.getLogger(__name__)


def is_compvis_ldm_config(config: Mapping[str, Any]) -> bool:
    model = config.get("model")
    return isinstance(model, Mapping) and str(model.get("target", "")).endswith("LatentDiffusion")


def compvis_schedule(info: LDMInfo) -> NoiseSchedule:
    """The LDM schedule, ending (t_prev = -1) on alpha_bar_0 as the CompVis DDIM sampler does."""
    if info.beta_schedule != "linear":
        raise ValueError(f"beta_schedule {info.beta_schedule!r} is not supported; allowed: 'linear' "
                         f"(CompVis: linear in sqrt(beta))")
    schedule = sqrt_linear_schedule(info.linear_start, info.linear_end, info.timesteps)
    return NoiseSchedule(schedule.betas, final_alpha_bar=float(schedule.alpha_bar[0]))


def latent_denoiser_from_compvis(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], name: str,
                                 use_ema: bool = True) -> LatentDenoiser:
    """Build from a parsed CompVis YAML and load a LatentDiffusion state_dict strictly.

    With `use_ema` the UNet takes the checkpoint's EMA weights (model_ema.*) when it holds them, as the
    published sampling scripts do inside `ema_scope()`; without them the trained weights are used.
    """
    unet, first_stage, info = ldm_modules_from_config(config, device="cpu")
    if info.parameterization != "eps":
        raise ValueError(f"parameterization {info.parameterization!r} is not supported; allowed: 'eps'")
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    if use_ema and not has_ema:
        log.info("%s holds no EMA weights (model_ema.*): using the trained UNet weights", name)
    unet_state, first_state = compvis_state_dict_split(state, use_ema and has_ema)
    params = config.get("model", config)["params"]
    load_state_dict_strict(unet, unet_state, f"checkpoint {name!r} (UNet, {UNET_PREFIX}*)",
                           params["unet_config"]["params"])
    load_state_dict_strict(first_stage, first_state, f"checkpoint {name!r} (first stage, {FIRST_STAGE_PREFIX}*)",
                           params["first_stage_config"]["params"])
    model = LatentDenoiser(unet, first_stage, compvis_schedule(info), name, config,
                           compvis_scale_factor(state, info), info.sample_shape)
    return model.eval()


def compvis_module(unet: nn.Module, first_stage: nn.Module, scale_factor: float) -> nn.Module:
    """A container whose state_dict has the CompVis LatentDiffusion keys (model.diffusion_model.*,
    first_stage_model.*, the scale_factor buffer), for exporting and for building test checkpoints."""
    holder, wrapper = nn.Module(), nn.Module()
    wrapper.diffusion_model = unet
    holder.model = wrapper
    holder.first_stage_model = first_stage
    holder.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
    return holder
