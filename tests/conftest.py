"""Shared tiny models and configs for the CPU test suite."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; read when Triton is imported (by modiff)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from modiff.diffusion.schedules import linear_schedule
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.models.registry import Denoiser
from modiff.utils import runs

# Tiny CPU tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
# competing with other processes made the suite ~7x slower (6.5 min vs 1 min). MODIFF_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MODIFF_TEST_THREADS", "1")))

TINY = DDIMUNetConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), in_channels=1, out_ch=1, image_size=16
)


def official_yaml(config: DDIMUNetConfig = TINY) -> dict[str, Any]:
    """A config in the official DDIM YAML layout (sections data/model/diffusion)."""
    model = config.to_dict()
    image_size = model.pop("image_size")
    return {
        "data": {"dataset": "TEST", "image_size": image_size, "channels": model["in_channels"]},
        "model": {"type": "simple", **model, "var_type": "fixedlarge", "ema_rate": 0.9999, "ema": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_diffusion_timesteps": 1000},
    }


def tiny_net(seed: int = 0, config: DDIMUNetConfig = TINY) -> DDIMUNet:
    """A random-weight tiny UNet in eval mode; 1-D params (norm scales, biases) perturbed so none is trivial."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DDIMUNet(config)
        with torch.no_grad():
            for p in net.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return net.eval()


class TameNet(nn.Module):
    """Eps of N(0, 0.5^2) data plus a small UNet term: samples stay in range, so PNGs are not saturated."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.unet = tiny_net(seed)
        self.register_buffer("alpha_bar", linear_schedule().alpha_bar.clone())

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.unet.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * self.unet(x, t)


@pytest.fixture
def tiny_denoiser() -> Denoiser:
    """The tiny random UNet behind the Denoiser interface (raw: its samples saturate)."""
    return Denoiser(tiny_net(0), linear_schedule(), "tiny", {})


@pytest.fixture
def tame_denoiser() -> Denoiser:
    """A Denoiser whose samples are real-valued images in range (for PNG tests)."""
    return Denoiser(TameNet(0), linear_schedule(), "tame", {})


def fail_file_write(monkeypatch: pytest.MonkeyPatch, nth: int, error: OSError, partial: bool = False) -> None:
    """Make the ``nth`` file write of `modiff.utils.runs.write_bytes_atomic` (the PNG writer's) raise ``error``,
    after writing half its bytes if ``partial``."""
    calls: list[int] = []
    real_write_all = runs.write_all

    def failing_write_all(descriptor: int, data: bytes) -> None:
        calls.append(descriptor)
        if len(calls) == nth:
            if partial:
                real_write_all(descriptor, bytes(data)[: len(data) // 2])
            raise error
        real_write_all(descriptor, data)

    monkeypatch.setattr(runs, "write_all", failing_write_all)

