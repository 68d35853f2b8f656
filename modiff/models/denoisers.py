"""The `Denoiser` wrappers: a network and its noise schedule behind one call, `model(x_t, t) -> eps`.

`Denoiser` wraps a pixel-space network (`net`); `LatentDenoiser` a latent UNet and, beside it, the
first-stage autoencoder that `decode`s sampled latents (CompVis LDM). Quantization, recording and BOP
counting see `network_modules()`: the denoising network only. `to_images` turns sampler outputs into
pixels for either.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from modiff.diffusion.schedules import NoiseSchedule
from modiff.models.autoencoder import DiagonalGaussianDistribution

__all__ = ["Denoiser", "LatentDenoiser", "to_images"]


class Denoiser(nn.Module):
    """An eps-prediction network and its noise schedule: `model(x_t, t) -> eps`.

    Layers live under `net`, so their qualified names read `net.down.0.block.0.conv1`. ``folder`` is the
    model folder it was loaded from (None for checkpoint files): where its shipped calibration lives.
    """

    folder: Optional[Path] = None
    clip_denoised = True  # whether the DDPM sampler clips x0_pred to [-1, 1], the data range of pixel models
    net_takes_keywords = False  # whether `net` is called with keyword arguments (no CUDA graphs for it)

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, name: str, config: Mapping[str, Any]):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.name = name
        self.source_config = dict(config)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.net.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)

    def network_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(qualified name, module) of the denoising network only, `net` itself included.

        What quantization, recording and BOP counting see: a latent model keeps its first stage beside
        `net`, in full precision, as the published LDM results do.
        """
        return self.net.named_modules(prefix="net")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.source_config, "parameters": sum(p.numel() for p in self.net.parameters())}


class LatentDenoiser(Denoiser):
    """An eps-prediction UNet on latents (`net`), its schedule, and the first-stage autoencoder beside it.

    `model(z_t, t) -> eps` as for pixel models; `decode(z)` turns sampled latents into images.
    """

    clip_denoised = False  # latents have no [-1, 1] range (CompVis' LatentDiffusion: clip_denoised = False)

    def __init__(self, net: nn.Module, first_stage: nn.Module, schedule: NoiseSchedule, name: str,
                 config: Mapping[str, Any], scale_factor: float, latent_shape: tuple[int, int, int]):
        super().__init__(net, schedule, name, config)
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor}")
        self.first_stage = first_stage.requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.latent_shape = tuple(int(s) for s in latent_shape)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.latent_shape  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, C', H, W) in [-1, 1] (clamped, as the LDM scripts do), float32."""
        z = z.to(next(self.first_stage.parameters()).dtype) / self.scale_factor
        return self.first_stage.decode(z).float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents. A KL posterior gives its mode, or a sample with `generator`."""
        h = self.first_stage.encode(x)
        if isinstance(h, DiagonalGaussianDistribution):  # a KL autoencoder
            h = h.mode() if generator is None else h.sample(generator=generator)
        return h * self.scale_factor

    def describe(self) -> dict[str, Any]:
        first = sum(p.numel() for p in self.first_stage.parameters())
        return {**super().describe(), "first_stage_parameters": first, "scale_factor": self.scale_factor,
                "latent_shape": list(self.latent_shape)}


def to_images(model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """Sampler output -> images in [-1, 1]: decoded for a latent model, unchanged for a pixel model.

    The one place where samples become pixels (generate, evaluate, the analysis drivers).
    """
    decode = getattr(model, "decode", None)
    return decode(x0) if callable(decode) else x0
