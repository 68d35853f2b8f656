"""What follows the kind of model: its timestep spacing and the layers an analysis looks at by default.

The analyses (Figures 1a, 1b, 3, the theorem checks) were written around the DDIM UNet; asked for a
latent model they must pick the same roles in the CompVis UNet, not the DDIM names.

==============  ===========================================  ==========================================
role            DDIMUNet (official DDIM layout)              UNetModel (CompVis LDM)
==============  ===========================================  ==========================================
middle block    ``net.mid`` (its output: ``block_2``'s)      ``net.middle_block``
``middle``      ``net.mid.block_1.conv1``                    ``net.middle_block.0.in_layers.2``
``up``          ``net.up.{l}.block.0.conv1``                 ``net.output_blocks.{i}.0.in_layers.2``
``down``        ``net.down.{l}.block.0.conv2``               ``net.input_blocks.{j}.0.out_layers.3``
spacing         ``uniform`` (the DDIM code)                  ``ldm`` (CompVis ``make_ddim_timesteps``)
==============  ===========================================  ==========================================

``l`` is the second resolution level (the first if there is one level); ``up`` is the first ResBlock
of that level on the decoder path (its input is the skip concatenation), ``down`` the first ResBlock of
that level on the encoder path. ``i`` and ``j`` are the indices of those ResBlocks in the CompVis lists.

diffusers networks (`DiffusersDenoiser`): a UNet (UNet2DModel, UNet2DConditionModel) has the middle
block ``net.mid_block``, ``middle`` = ``net.mid_block.resnets.0.conv1``, ``up`` =
``net.up_blocks.{L-1-l}.resnets.0.conv1`` and ``down`` = ``net.down_blocks.{l}.resnets.0.conv2`` (L levels;
diffusers lists the up path from the lowest resolution). A DiT has no resolution levels: its middle block
is ``net.transformer_blocks.{n // 2}`` and the roles are the first feed-forward Linear
(``ff.net.0.proj``) of the first (``down``), middle and last (``up``) blocks. The spacing is the
scheduler's (`DiffusersDenoiser.spacing`).

Edge layers (`edge_layers`): the layer that reads x_t and the layer that writes the prediction.
``net.conv_in`` / ``net.conv_out`` (DDIMUNet and diffusers UNets), ``net.input_blocks.0.0`` / ``net.out.2``
(CompVis), ``net.pos_embed.proj`` / ``net.proj_out_2`` (DiT: patch embedding and the final projection).
The published MoDiff and Q-Diffusion code quantizes them like every other layer (the presets do too);
PTQ recipes that keep them in higher precision exclude them by these names.
"""
from __future__ import annotations

from torch import nn

from modiff.diffusion.schedules import Spacing
from modiff.models.ddim_unet import DDIMUNet
from modiff.models.denoisers import LatentDenoiser
from modiff.models.diffusers.denoiser import DiffusersDenoiser
from modiff.models.ldm_unet import UNetModel

__all__ = ["default_spacing", "edge_layers", "middle_block", "representative_layers"]


def default_spacing(model: nn.Module) -> Spacing:
    """``ldm`` for a latent model (as the LDM papers sample), ``uniform`` otherwise (the DDIM code); a
    diffusers model's scheduler decides (``ldm`` for steps_offset 1, as Stable Diffusion)."""
    if isinstance(model, DiffusersDenoiser):
        return model.spacing
    return "ldm" if isinstance(model, LatentDenoiser) else "uniform"


def _diffusers_kind(model: nn.Module) -> str | None:
    """"unet" or "dit" for a wrapped diffusers network, None for the toolkit's own networks."""
    if not isinstance(model, DiffusersDenoiser):
        return None
    return "dit" if hasattr(model.net, "transformer_blocks") else "unet"


def _network(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    if not isinstance(net, (DDIMUNet, UNetModel)):
        raise ValueError(f"no default layers for a {type(model).__name__} whose network is a "
                         f"{type(net).__name__}; allowed networks: DDIMUNet, UNetModel. Pass the site names yourself.")
    return net


def middle_block(model: nn.Module) -> str:
    """The qualified name of the middle block (the features of Figures 1a and 3)."""
    kind = _diffusers_kind(model)
    if kind is not None:
        return "net.mid_block" if kind == "unet" else f"net.transformer_blocks.{len(model.net.transformer_blocks) // 2}"
    return "net.mid" if isinstance(_network(model), DDIMUNet) else "net.middle_block"


def edge_layers(model: nn.Module) -> tuple[str, str]:
    """(first, last): the layer that reads x_t and the layer that writes the prediction (module table)."""
    kind = _diffusers_kind(model)
    if kind is not None:
        names = ("net.conv_in", "net.conv_out") if kind == "unet" else ("net.pos_embed.proj", "net.proj_out_2")
    else:
        names = ("net.conv_in", "net.conv_out") if isinstance(_network(model), DDIMUNet) else \
            ("net.input_blocks.0.0", "net.out.2")
    return tuple(_checked(model, dict(zip(("first", "last"), names))).values())  # type: ignore[return-value]


def _diffusers_layers(model: nn.Module, kind: str) -> dict[str, str]:
    net = model.net
    if kind == "dit":
        blocks = len(net.transformer_blocks)
        block = "net.transformer_blocks.{}.ff.net.0.proj"
        return _checked(model, {"middle": block.format(blocks // 2), "up": block.format(blocks - 1),
                                "down": block.format(0)})
    levels = len(net.down_blocks)
    level = min(1, levels - 1)
    return _checked(model, {"middle": "net.mid_block.resnets.0.conv1",
                            "up": f"net.up_blocks.{levels - 1 - level}.resnets.0.conv1",
                            "down": f"net.down_blocks.{level}.resnets.0.conv2"})


def _checked(model: nn.Module, names: dict[str, str]) -> dict[str, str]:
    for name in names.values():
        model.get_submodule(name)  # an internal invariant: the layout above matches the classes
    return names


def representative_layers(model: nn.Module) -> dict[str, str]:
    """Role (``middle``, ``up``, ``down``) -> a Conv2d of that part of the UNet (see the module table).

    The layers of Figure 1b and of the theorem checks; a quantized copy has the same names.
    """
    kind = _diffusers_kind(model)
    if kind is not None:
        return _diffusers_layers(model, kind)
    net = _network(model)
    if isinstance(net, DDIMUNet):
        level = min(1, len(net.config.ch_mult) - 1)
        return _checked(model, {"middle": "net.mid.block_1.conv1", "up": f"net.up.{level}.block.0.conv1",
                                "down": f"net.down.{level}.block.0.conv2"})
    levels, per_level = len(net.channel_mult), net.num_res_blocks + 1
    level = min(1, levels - 1)
    up, down = (levels - 1 - level) * per_level, 1 + level * per_level
    return _checked(model, {"middle": "net.middle_block.0.in_layers.2", "up": f"net.output_blocks.{up}.0.in_layers.2",
                            "down": f"net.input_blocks.{down}.0.out_layers.3"})
