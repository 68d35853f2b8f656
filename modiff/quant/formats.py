"""Number formats of quantized values: integer grids (`modiff.quant.primitives`) and FP8 e4m3.

``int``: the uniform grids of `QuantSpec` (b bits, asymmetric or symmetric). ``fp8_e4m3``: every value is
scaled into the range of float8 e4m3 (OCP "e4m3fn": 4 exponent bits, 3 mantissa bits, bias 7, no
infinities, largest finite 448, subnormal step 2^-9) and rounded to the nearest e4m3 value (ties to
even), so the relative step is 2^-3 instead of a uniform grid:

    s = max(absmax / 448, MIN_SCALE)      one scale per group of `QuantSpec.granularity` (symmetric only)
    q = e4m3(clamp(x * (1 / s), -448, 448))   rounded to nearest even by torch's float8_e4m3fn cast
    Q(x) = s q

This is what the FP8 path of the real backend (`modiff.quant.kernels.real`) computes, and the simulator's
definition of it: the same x * (1 / s) as the integer fake quantizer, then the format's own rounding.
Rounding bound per element: |x - Q(x)| <= 2^-4 |x| for |x| / s >= 2^-6 (normal numbers), <= s 2^-10 below.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from modiff.quant.primitives import MIN_SCALE, QuantSpec, reduce_range

__all__ = ["NumberFormat", "FP8_MAX", "fp8_scale", "fake_quantize_fp8", "fp8_codes", "quantize_dynamic_fp8",
           "check_fp8_spec"]

NumberFormat = Literal["int", "fp8_e4m3"]
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
FP8_DTYPE = torch.float8_e4m3fn


def check_fp8_spec(spec: QuantSpec, what: str) -> None:
    """FP8 values are symmetric (sign bit) and 8 bits wide, rounded to nearest: refuse other specs."""
    if spec.bits != 8 or spec.scheme != "symmetric" or spec.rounding != "nearest":
        raise ValueError(f"format 'fp8_e4m3' needs {what} with bits=8, scheme='symmetric', rounding='nearest'; "
                         f"got bits={spec.bits}, scheme={spec.scheme!r}, rounding={spec.rounding!r}")


def fp8_scale(x_min: Tensor, x_max: Tensor) -> Tensor:
    """s = max(absmax / 448, MIN_SCALE) from group ranges (float32, or float64 for float64 ranges)."""
    dtype = torch.float64 if x_min.dtype == torch.float64 else torch.float32
    absmax = torch.maximum(x_min.to(dtype).abs(), x_max.to(dtype).abs())
    return torch.clamp(absmax / torch.tensor(FP8_MAX, dtype=dtype, device=absmax.device), min=MIN_SCALE)


def fp8_codes(x: Tensor, scale: Tensor) -> Tensor:
    """The e4m3 values q of x (as float8_e4m3fn), scale broadcasting against x."""
    scaled = x.to(torch.promote_types(x.dtype, scale.dtype)) * scale.reciprocal()
    return torch.clamp(scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fake_quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """Q(x) = s e4m3(clamp(x / s, -448, 448)), same shape and dtype as ``x`` (no gradient path: the FP8
    format serves sampling, not calibration)."""
    return (fp8_codes(x, scale).to(scale.dtype) * scale).to(x.dtype)


def quantize_dynamic_fp8(x: Tensor, spec: QuantSpec, split: Optional[int] = None) -> Tensor:
    """FP8 fake quantization with scales from ``x``'s own ranges per ``spec.granularity`` (no host sync);
    with ``split`` the two channel halves get their own scales."""
    parts = [x] if split is None else list(x.split([split, x.shape[1] - split], dim=1))
    out = [fake_quantize_fp8(p, fp8_scale(*reduce_range(p.detach(), spec))) for p in parts]
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)
