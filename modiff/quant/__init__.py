"""Quantization: primitives, observers, quantized layers, MoDiff state, presets and BOPs."""
from modiff.quant.api import quant_layers, quantize, select_layers
from modiff.quant.config import ActQuant, QuantConfig, WeightQuant
from modiff.quant.modulated import trajectory
from modiff.quant.presets import preset_table, presets
from modiff.quant.primitives import QuantSpec

__all__ = [
    "ActQuant",
    "QuantConfig",
    "QuantSpec",
    "WeightQuant",
    "preset_table",
    "presets",
    "quant_layers",
    "quantize",
    "select_layers",
    "trajectory",
]
