"""Model families: the official DDIM UNet, and the loader that returns a network with its schedule."""
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig, ddim_unet_from_config
from modiff.models.denoisers import Denoiser
from modiff.models.registry import MODEL_PRESETS, load_model

__all__ = ["DDIMUNet", "DDIMUNetConfig", "Denoiser", "MODEL_PRESETS", "ddim_unet_from_config", "load_model"]
