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
"""
from __future__ import annotations

from torch import nn

from modiff.diffusion.schedules import Spacing
from modiff.models.ddim_unet import DDIMUNet
from modiff.models.denoisers import LatentDenoiser
from modiff.models.ldm_unet import UNetModel

__all__ = ["default_spacing", "middle_block", "representative_layers"]


def default_spacing(model: nn.Module) -> Spacing:
    """``ldm`` for a latent model (as the LDM papers sample), ``uniform`` otherwise (the DDIM code)."""
    return "ldm" if isinstance(model, LatentDenoiser) else "uniform"


def _network(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    if not isinstance(net, (DDIMUNet, UNetModel)):
        raise ValueError(f"no default layers for a {type(model).__name__} whose network is a "
                         f"{type(net).__name__}; allowed networks: DDIMUNet, UNetModel. Pass the site names yourself.")
    return net


def middle_block(model: nn.Module) -> str:
    """The qualified name of the middle block (the features of Figures 1a and 3)."""
    return "net.mid" if isinstance(_network(model), DDIMUNet) else "net.middle_block"


def _checked(model: nn.Module, names: dict[str, str]) -> dict[str, str]:
    for name in names.values():
        model.get_submodule(name)  # an internal invariant: the layout above matches the classes
    return names


def representative_layers(model: nn.Module) -> dict[str, str]:
    """Role (``middle``, ``up``, ``down``) -> a Conv2d of that part of the UNet (see the module table).

    The layers of Figure 1b and of the theorem checks; a quantized copy has the same names.
    """
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
