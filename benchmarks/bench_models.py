"""The models the benchmarks run: a shipped preset by name, or "cifar10", the CIFAR-10 DDIM UNet's shape with
seeded random weights (the official checkpoint is not shipped; speed does not depend on the weights)."""
from __future__ import annotations

import torch

import modiff as md
from modiff.diffusion.schedules import linear_schedule
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser

CIFAR10 = DDIMUNetConfig(ch=128, in_channels=3, out_ch=3)


def benchmark_model(name: str) -> Denoiser:
    if name == "cifar10":
        torch.manual_seed(0)
        return Denoiser(DDIMUNet(CIFAR10), linear_schedule(), "cifar10", {})
    return md.load_model(name)
