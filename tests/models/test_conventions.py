"""Model-dependent defaults: timestep spacing, middle block and representative layers by UNet type."""
from __future__ import annotations

import pytest
import torch

import modiff as md
from modiff.models.ldm import ldm_modules_from_config
from modiff.pipelines.train_ldm import LatentUNetTrainConfig, LDMTrainConfig

from conftest import tiny_net
from test_latent import _tiny_model


def test_ddim_unet_defaults(tiny_denoiser: md.Denoiser) -> None:
    """DDIMUNet: the layers the DDIM notebooks always used, uniform spacing; a quantized copy keeps them."""
    expected = {"middle": "net.mid.block_1.conv1", "up": "net.up.1.block.0.conv1", "down": "net.down.1.block.0.conv2"}
    assert md.representative_layers(tiny_denoiser) == expected
    assert md.middle_block(tiny_denoiser) == "net.mid" and md.default_spacing(tiny_denoiser) == "uniform"
    assert md.representative_layers(md.quantize(tiny_denoiser, md.presets["w8a4-modiff"])) == expected


def test_tiny_latent_unet_defaults() -> None:
    """Tiny CompVis UNet (channel_mult (1, 2), 1 ResBlock per level): input_blocks = [conv_in, level 0 ResBlock,
    down, level 1 ResBlock (index 1 + 1 * 2 = 3)]; output_blocks start with level 1 (index 0)."""
    model = _tiny_model()
    layers = md.representative_layers(model)
    assert layers == {"middle": "net.middle_block.0.in_layers.2", "up": "net.output_blocks.0.0.in_layers.2",
                      "down": "net.input_blocks.3.0.out_layers.3"}
    assert md.middle_block(model) == "net.middle_block" and md.default_spacing(model) == "ldm"
    # level 1: the down layer maps 64 -> 64 channels; the up layer reads cat([h (64), skip (64)]).
    assert model.get_submodule(layers["down"]).weight.shape[:2] == (64, 64)
    assert model.get_submodule(layers["up"]).weight.shape[:2] == (64, 128)


def test_fmnist_ldm_unet_defaults() -> None:
    """The fmnist-ldm UNet (channel_mult (1, 2, 3), 2 ResBlocks per level, model_channels 64): level 1 starts at
    input_blocks 1 + 1 * 3 = 4 and at output_blocks (3 - 1 - 1) * 3 = 3, whose input is 192 (level 2) + 128 (skip)."""
    unet, first_stage, _ = ldm_modules_from_config(LDMTrainConfig().compvis_yaml())
    model = md.LatentDenoiser(unet, first_stage, md.linear_schedule(), "fmnist-ldm", {}, 1.0, (4, 8, 8))
    layers = md.representative_layers(model)
    assert layers == {"middle": "net.middle_block.0.in_layers.2", "up": "net.output_blocks.3.0.in_layers.2",
                      "down": "net.input_blocks.4.0.out_layers.3"}
    assert model.get_submodule(layers["up"]).weight.shape[:2] == (128, 320)
    assert model.get_submodule(layers["middle"]).weight.shape[:2] == (192, 192)


def test_one_level_unets_use_their_only_level() -> None:
    """With a single resolution level, up and down come from level 0."""
    from conftest import TINY
    from dataclasses import replace

    ddim = md.Denoiser(tiny_net(0, replace(TINY, ch_mult=(1,), attn_resolutions=())), md.linear_schedule(), "t", {})
    assert md.representative_layers(ddim)["up"] == "net.up.0.block.0.conv1"
    config = LDMTrainConfig(unet=LatentUNetTrainConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1,
                                                       attention_resolutions=()))
    unet, first_stage, _ = ldm_modules_from_config(config.compvis_yaml())
    latent = md.LatentDenoiser(unet, first_stage, md.linear_schedule(), "one", {}, 1.0, (4, 8, 8))
    assert md.representative_layers(latent) == {"middle": "net.middle_block.0.in_layers.2",
                                                "up": "net.output_blocks.0.0.in_layers.2",
                                                "down": "net.input_blocks.1.0.out_layers.3"}


def test_unknown_network_is_refused(tame_denoiser: md.Denoiser) -> None:
    with pytest.raises(ValueError, match="TameNet; allowed networks: DDIMUNet, UNetModel"):
        md.representative_layers(tame_denoiser)
    with pytest.raises(ValueError, match="Pass the site names yourself"):
        md.middle_block(torch.nn.Linear(2, 2))
    assert md.default_spacing(tame_denoiser) == "uniform"
