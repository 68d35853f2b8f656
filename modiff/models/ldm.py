"""CompVis latent-diffusion models: the latent UNet, the KL/VQ first stages, and checkpoint plumbing.

The networks live in `ldm_unet.py` (UNetModel) and `autoencoder.py` (Encoder, Decoder, AutoencoderKL,
VQModel, ...); this module re-exports them and maps a CompVis LDM YAML and `.ckpt` onto them:

- `ldm_modules_from_config(yaml)` builds (UNet, first stage, LDMInfo) from `model.params`;
- `compvis_state_dict_split(state, use_ema)` splits a LatentDiffusion `state_dict` into the two
  modules' state dicts, taking the UNet from the EMA copy when asked, as the published scripts do;
- `compvis_scale_factor(state, info)` gives the latent scale (a checkpoint buffer when scale_by_std).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

import torch

from modiff.models.autoencoder import (
    AutoencoderKL,
    Decoder,
    DiagonalGaussianDistribution,
    Encoder,
    VectorQuantizer,
    VQModel,
)
from modiff.models.ldm_unet import UNetModel, timestep_embedding

__all__ = [
    "AutoencoderKL", "Decoder", "DiagonalGaussianDistribution", "Encoder", "LDMInfo", "UNetModel",
    "VQModel", "VectorQuantizer", "compvis_scale_factor", "compvis_state_dict_split", "ldm_modules_from_config",
    "timestep_embedding",
]

FirstStage = Union[AutoencoderKL, VQModel]
FirstStageKind = Literal["kl", "vq"]

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."

# LatentDiffusion / DDPM defaults for the keys we read.
_LDM_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000, "beta_schedule": "linear", "linear_start": 1e-4, "linear_end": 2e-2,
    "image_size": 256, "channels": 3, "parameterization": "eps", "scale_factor": 1.0, "scale_by_std": False,
}
# First-stage params that only matter for training or for loading weights separately.
_FIRST_STAGE_IGNORED = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "monitor", "batch_resize_range",
                        "scheduler_config", "lr_g_factor"}


@dataclass(frozen=True)
class LDMInfo:
    """What a CompVis LatentDiffusion config says beyond the two networks.

    `beta_schedule="linear"` is CompVis' sqrt-linear one: betas = linspace(sqrt(start), sqrt(end), T)^2.
    With `scale_by_std`, the true scale factor is the checkpoint's `scale_factor` buffer
    (see `compvis_scale_factor`); `scale_factor` here is then only the config's initial value.
    """

    image_size: int  # latent side length
    channels: int  # latent channels
    timesteps: int
    beta_schedule: str
    linear_start: float
    linear_end: float
    parameterization: str
    scale_factor: float
    scale_by_std: bool
    first_stage: FirstStageKind

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


def _model_params(config: Mapping[str, Any]) -> Mapping[str, Any]:
    node = config.get("model", config)
    if not isinstance(node, Mapping) or "params" not in node:
        raise ValueError(f"expected a CompVis LDM config with model.params, got top-level keys {sorted(config)}")
    target = str(node.get("target", "LatentDiffusion"))
    if not target.endswith("LatentDiffusion"):
        raise ValueError(f"model.target must be a LatentDiffusion class, got {target!r}")
    params = node["params"]
    cond = params.get("cond_stage_config", "__is_unconditional__")
    if cond != "__is_unconditional__":
        raise ValueError(f"only unconditional LDMs are supported (cond_stage_config '__is_unconditional__'), "
                         f"got cond_stage_config={cond!r}")
    for key in ("unet_config", "first_stage_config"):
        if key not in params or "params" not in params[key]:
            raise ValueError(f"model.params.{key} with its params is missing (got keys {sorted(params)})")
    return params


def _first_stage(config: Mapping[str, Any]) -> tuple[FirstStage, FirstStageKind]:
    target = str(config.get("target", ""))
    if target.endswith("AutoencoderKL"):
        kind: FirstStageKind = "kl"
        required, optional = {"ddconfig", "embed_dim"}, set()
    elif target.endswith("VQModelInterface"):
        kind = "vq"
        required, optional = {"ddconfig", "embed_dim", "n_embed"}, {"remap", "sane_index_shape"}
    else:
        raise ValueError(f"first_stage_config.target must end with 'AutoencoderKL' or 'VQModelInterface', "
                         f"got {target!r}")
    params = {k: v for k, v in config["params"].items() if k not in _FIRST_STAGE_IGNORED}
    for key, allowed in (("colorize_nlabels", None), ("use_ema", False)):
        if params.pop(key, allowed) != allowed:
            raise ValueError(f"first_stage_config.params.{key} must be {allowed} for an LDM first stage")
    unknown, missing = set(params) - required - optional, required - set(params)
    if unknown or missing:
        raise ValueError(f"first_stage_config.params of {target}: unknown {sorted(unknown)}, missing {sorted(missing)}")
    ddconfig = dict(params["ddconfig"])
    if kind == "kl":
        return AutoencoderKL(ddconfig, embed_dim=int(params["embed_dim"])), kind
    if params.get("remap") is not None:
        raise ValueError(f"codebook remapping is not supported, got remap={params['remap']!r}")
    model = VQModel(ddconfig, n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]),
                    sane_index_shape=bool(params.get("sane_index_shape", False)))
    return model, kind


def ldm_modules_from_config(config: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None
                            ) -> tuple[UNetModel, FirstStage, LDMInfo]:
    """(UNet, first stage, info) from a parsed CompVis LDM YAML (e.g. lsun_churches-ldm-kl-8.yaml).

    `device="meta"` builds the modules without memory (for layout checks or lazy loading).
    """
    params = _model_params(config)
    values = {k: params.get(k, default) for k, default in _LDM_DEFAULTS.items()}
    with torch.device(device) if device is not None else nullcontext():
        unet = UNetModel(**params["unet_config"]["params"])
        first_stage, kind = _first_stage(params["first_stage_config"])
    info = LDMInfo(image_size=int(values["image_size"]), channels=int(values["channels"]),
                   timesteps=int(values["timesteps"]), beta_schedule=str(values["beta_schedule"]),
                   linear_start=float(values["linear_start"]), linear_end=float(values["linear_end"]),
                   parameterization=str(values["parameterization"]), scale_factor=float(values["scale_factor"]),
                   scale_by_std=bool(values["scale_by_std"]), first_stage=kind)
    if unet.in_channels != info.channels or unet.out_channels != info.channels:
        raise ValueError(f"the UNet maps {unet.in_channels} -> {unet.out_channels} channels but the latents have "
                         f"channels={info.channels}")
    if first_stage.embed_dim != info.channels:
        raise ValueError(f"the first stage has embed_dim={first_stage.embed_dim} but the latents have "
                         f"channels={info.channels}")
    return unet, first_stage, info


def ema_key(unet_key: str) -> str:
    """LitEma's buffer name for a UNet parameter: dots removed from 'diffusion_model.<name>'."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def compvis_state_dict_split(state: Mapping[str, torch.Tensor], use_ema: bool
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(UNet state, first-stage state) from a LatentDiffusion `state_dict` (the .ckpt's 'state_dict').

    With `use_ema`, every UNet tensor comes from its `model_ema.*` copy, as `ema_scope()` switches
    the published sampling scripts to. Schedule buffers and other keys are left out.
    """
    if "state_dict" in state and not any(k.startswith(UNET_PREFIX) for k in state):
        raise ValueError("got a whole checkpoint; pass its ckpt['state_dict'] instead")
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    first_stage = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)}
    if not unet or not first_stage:
        raise ValueError(f"not a LatentDiffusion state_dict: {len(unet)} '{UNET_PREFIX}*' and {len(first_stage)} "
                         f"'{FIRST_STAGE_PREFIX}*' keys (both must be present)")
    if use_ema:
        if not any(k.startswith(EMA_PREFIX) for k in state):
            raise ValueError("use_ema=True but the checkpoint holds no EMA weights (no 'model_ema.*' keys); "
                             "pass use_ema=False")
        missing = [ema_key(k) for k in unet if ema_key(k) not in state]
        if missing:
            raise ValueError(f"use_ema=True but {len(missing)} EMA tensors are missing, e.g. {missing[:3]}")
        unet = {k: state[ema_key(k)] for k in unet}
    return unet, first_stage


def compvis_scale_factor(state: Mapping[str, torch.Tensor], info: LDMInfo) -> float:
    """The latent scale: the checkpoint's `scale_factor` buffer when the config has scale_by_std."""
    if not info.scale_by_std:
        return info.scale_factor
    if "scale_factor" not in state:
        raise ValueError("the config has scale_by_std=True but the state_dict has no 'scale_factor' buffer")
    return float(state["scale_factor"])
