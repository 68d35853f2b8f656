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


@pytest.mark.parametrize("preset, passes", [("w8a4-modiff", 5), ("w8a4", 3)])
def test_preset_adds_its_quantize_passes_over_each_selected_input(preset: str, passes: int) -> None:
    """The conv's input holds 16 values: modulated quantization moves 5 x 16 (ranges read a_t and a_hat, the
    update reads both and writes a_hat), direct 3 x 16; the other kinds are unchanged."""
    moved, flops = traffic_floor.count(_ConvNorm(), preset)
    assert moved == {"convolution": 48, "groupnorm": 96, "quantize": passes * 16}
    assert flops == {"convolution": 576}


def test_modulation_of_a_shared_input_counts_once(tiny_denoiser) -> None:
    """q, k and v of an attention block share one MoDiff state: their input is modulated once, not three
    times; direct quantization still counts every layer's input."""
    direct_inputs = traffic_floor.count(tiny_denoiser, "w8a4")[0]["quantize"] / 3
    modulated_inputs = traffic_floor.count(tiny_denoiser, "w8a4-modiff")[0]["quantize"] / 5
    blocks = [m for m in tiny_denoiser.net.modules() if getattr(m, "shared_input", None)]
    shared = []
    hooks = [b.q.register_forward_pre_hook(lambda m, args: shared.append(args[0].numel())) for b in blocks]
    tiny_denoiser(torch.zeros(1, *tiny_denoiser.sample_shape), torch.tensor([500]))
    for hook in hooks:
        hook.remove()
    assert len(shared) == len(blocks) > 1
    assert direct_inputs - modulated_inputs == 2 * sum(shared)


@pytest.mark.parametrize("preset", ["fp", "w8a32"])
def test_presets_with_exact_activations_add_nothing(preset: str) -> None:
    assert traffic_floor.count(_ConvNorm(), preset) == traffic_floor.count(_ConvNorm())


def test_caching_presets_are_refused() -> None:
    with pytest.raises(ValueError, match="only direct and modulated"):
        traffic_floor.count(_ConvNorm(), "cache3")
