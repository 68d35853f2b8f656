"""benchmarks/traffic_floor.py counts what its docstring says: a hand-computed network, and the convolution
and attention FLOPs of a UNet against modiff's own MAC counter."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from modiff.quant.cost import measure_macs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
traffic_floor = pytest.importorskip("traffic_floor")


class _ConvNorm(nn.Module):
    sample_shape = (1, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_hand_computed_convolution_and_groupnorm() -> None:
    """Conv 1 -> 2 channels on 4x4: reads 16, writes 32, 2 * 32 * 9 FLOPs; GroupNorm reads 32 twice, writes 32."""
    moved, flops = traffic_floor.count(_ConvNorm())
    assert moved == {"convolution": 48, "groupnorm": 96}
    assert flops == {"convolution": 576}


def test_unet_flops_match_modiffs_mac_counter(tiny_denoiser) -> None:
    moved, flops = traffic_floor.count(tiny_denoiser)
    x = torch.zeros(1, *tiny_denoiser.sample_shape)
    costs, attention_macs = measure_macs(tiny_denoiser, x, torch.tensor([500]))
    conv_macs = sum(c.macs for c in costs if c.kind == "Conv2d")
    assert flops["convolution"] == 2 * conv_macs and flops["attention"] == 2 * attention_macs
    assert set(moved) >= {"convolution", "groupnorm", "residual add", "concatenation", "attention"}
