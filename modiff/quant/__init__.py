"""Quantization. The simulator: `primitives` (QuantSpec, fake quantization), `formats` (FP8 e4m3), `observers`,
`config`, `layers/` (direct, modulated; the MoDiff state and `trajectory`), `kernels/`, `api` (`quantize`),
`presets` and `cost` (BOPs, memory). The real W8A8 backend (``QuantConfig(backend="real")``): `layers/real` and
`kernels/real`. Q-Diffusion calibration of static presets: `ptq/`."""
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.api import quant_layers, quantize, select_layers
from modiff.quant.ptq.data import CalibData, CalibDataConfig, collect_calib_data, load_calib_data, save_calib_data
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate, observe_activations
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.config import ActQuant, QuantConfig, WeightQuant
from modiff.quant.layers.trajectory import trajectory
from modiff.quant.presets import preset_table, presets
from modiff.quant.primitives import QuantSpec
from modiff.quant.ptq.saved import load_quantized, save_quantized
from modiff.quant.ptq.shipped import shipped_model  # also registers the AdaRound weight codes with quantize

__all__ = [
    "ActCalibConfig",
    "AdaRoundConfig",
    "CalibData",
    "CalibDataConfig",
    "CalibrationConfig",
    "calibrate",
    "collect_calib_data",
    "load_calib_data",
    "load_quantized",
    "observe_activations",
    "save_calib_data",
    "save_quantized",
    "shipped_model",
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
