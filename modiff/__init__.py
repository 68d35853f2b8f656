"""modiff: quantized diffusion models, MoDiff (modulated diffusion) and Q-Diffusion, measured end to end."""
from modiff._version import __version__

from modiff.diffusion.sampling import StepInfo, sample_ddim, sample_ddpm, sample_dpm_solver
from modiff.diffusion.schedules import NoiseSchedule, linear_schedule, timesteps
from modiff.models.conventions import default_spacing, edge_layers, middle_block, representative_layers
from modiff.models.denoisers import Denoiser, LatentDenoiser, to_images
from modiff.models.registry import load_model
from modiff.quant import ActQuant, QuantConfig, QuantSpec, WeightQuant, presets, quantize, trajectory
from modiff.record import ChannelAbsMax, Histogram, Outliers, Quantiles, Stats, TensorSpec, load_recording, record
from modiff.utils.rng import SeedStreams, noise, parse_seeds

__all__ = [
    "ChannelAbsMax",
    "Histogram",
    "Outliers",
    "Quantiles",
    "Stats",
    "TensorSpec",
    "load_recording",
    "record",
    "ActQuant",
    "Denoiser",
    "LatentDenoiser",
    "QuantConfig",
    "QuantSpec",
    "WeightQuant",
    "presets",
    "quantize",
    "trajectory",
    "NoiseSchedule",
    "SeedStreams",
    "StepInfo",
    "linear_schedule",
    "load_model",
    "noise",
    "parse_seeds",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_solver",
    "timesteps",
    "to_images",
    "default_spacing",
    "edge_layers",
    "middle_block",
    "representative_layers",
]
