"""Layers of the real backend: W8A8 and W4A8 Conv2d/Linear on tensor cores, direct and modulated (MoDiff).

`QuantConfig(backend="real")` makes `modiff.quantize` build these instead of the simulator's layers. They are the
simulator's layers (`QuantLayer`, `ModulatedLayer`) with the weight codes packed once, here, for the kernels of
`modiff.quant.kernels.real` (which say exactly what is computed). A call on a CUDA tensor with Triton installed
runs the kernels; any other call runs the simulator's own forward on the same config, so the fallback is the
simulator bit for bit (a CPU model, a machine without Triton). The choice is made per call from the device,
which stays the same within a trajectory.

Modulated state on the kernel path: a_hat (input-shaped) and o_hat (output-shaped), both in
`QuantConfig.state_dtype` ("auto": float32 here; see `_REAL_AUTO_STATE`) and in the NHWC-dense
layout of the kernels, allocated at warm-up (o_hat = A_q(a) + b: the bias enters once) and updated in place by
the kernels after it, so a CUDA graph of one step replays the next.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from modiff.quant.config import QuantConfig
from modiff.quant.formats import fp8_codes
from modiff.quant.kernels.real import (TRITON, Geometry, pack_weight, pack_weight_int4, real_direct, real_modulated,
                                       register_ops)
from modiff.quant.layers.direct import QuantLayer
from modiff.quant.layers.modulated import ModulatedLayer, consumed, state_dtype

__all__ = ["RealQuantLayer", "RealModulatedLayer", "use_real_kernels", "backend_record"]

# o_hat accumulates its own rounding, which the error feedback does not correct: on the H200, a bf16 state put
# the real FP8 path 0.016-0.032 from its simulator (growing over 100 steps), float32 0.007-0.017
# (benchmarks/README.md, "Real W8A8 MoDiff"). So "auto" keeps the real state in float32.
_REAL_AUTO_STATE = torch.float32


def use_real_kernels(x: Tensor) -> bool:
    """Whether a call on ``x`` runs the kernels (CUDA with Triton) rather than the simulator."""
    return TRITON and x.is_cuda


def backend_record(model: nn.Module, device: torch.device) -> Optional[dict[str, str]]:
    """What computes a quantized model's layers on ``device``, for manifests: the backend its config asks for,
    the one that runs ("real": the kernels; "simulated": the simulator, also as the real backend's fallback) and
    the number format. None for a model without a quantization config."""
    config = getattr(model, "quant_config", None)
    if not isinstance(config, QuantConfig):
        return None
    runs = "real" if config.backend == "real" and TRITON and device.type == "cuda" else "simulated"
    return {"asked": config.backend, "runs": runs, "format": config.format}


def _nhwc(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.contiguous()


def _output_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _RealWeights:
    """The packed weights and geometry shared by both real layers (a mixin over QuantLayer)."""

    weight_packed: Tensor
    weight_scale_n: Tensor
    weight_offset_n: Optional[Tensor]  # 4-bit weights: the per-channel offsets of `pack_weight_int4`

    def __init__(self, layer: nn.Module, config: QuantConfig, name: str, split: Optional[int] = None):
        super().__init__(layer, config, name, split)  # type: ignore[call-arg]  # QuantLayer, next in the MRO
        self._prepare(layer)

    def _prepare(self, layer: nn.Module) -> None:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.dilation != (1, 1) or not isinstance(layer.padding, tuple):
                raise ValueError(f"layer {self.name}: the real backend's convolution takes groups=1, dilation=1 and "
                                 f"numeric padding; got groups={layer.groups}, dilation={layer.dilation}, "
                                 f"padding={layer.padding!r} (exclude it with QuantConfig.exclude)")
            self.conv_geometry = (tuple(layer.stride), tuple(layer.padding))
        else:
            self.conv_geometry = None
        self._pack()
        if torch.cuda.is_available():
            register_ops()  # eagerly: a compiled graph must find the ops registered

    def _pack(self) -> None:
        spec = self.config.weight.spec
        offset = None
        if self.config.format == "fp8_e4m3":
            packed = pack_weight(fp8_codes(self.weight.detach().float(), self.weight_scale).float(), "fp8_e4m3")
        elif spec.bits == 4:
            packed, offset = pack_weight_int4(self.weight_codes(), self.weight_zero_point, spec.qmin)
        else:
            packed = pack_weight(self.weight_codes(), "int")
        self.register_buffer("weight_packed", packed, persistent=False)
        self.register_buffer("weight_offset_n", offset, persistent=False)
        self.register_buffer("weight_scale_n", self.weight_scale.reshape(-1).float().contiguous(), persistent=False)

    def set_weight_codes(self, codes: Tensor, scale: Tensor, zero_point: Tensor) -> None:
        super().set_weight_codes(codes, scale, zero_point)
        self._pack()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """A loaded weight_q is packed again, so the kernels and the simulator's fallback compute with one weight."""
        super()._load_from_state_dict(*args, **kwargs)
        self._pack()

    def _geometry(self, x: Tensor) -> Geometry:
        n = self.weight.shape[0]
        if self.conv_geometry is None:  # Linear: a 1x1 convolution over the tokens of each sample
            tokens = x.numel() // (x.shape[0] * x.shape[-1])
            return [x.shape[0], 1, tokens, x.shape[-1], 1, tokens, n, 1, 1, 1, 1, 0, 0]
        (sh, sw), (ph, pw) = self.conv_geometry
        b, c, h, w = x.shape
        kh, kw = self.weight.shape[2:]
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        return [b, h, w, c, ho, wo, n, kh, kw, sh, sw, ph, pw]

    @staticmethod
    def _shaped(out: Tensor, x: Tensor, geometry: Geometry) -> Tensor:
        """The kernels' (M, N) output as the layer's: (B, N, Ho, Wo) channels_last, or (B, ..., N)."""
        if x.ndim == 4:
            b, ho, wo, n = geometry[0], geometry[4], geometry[5], geometry[6]
            return out.view(b, ho, wo, n).permute(0, 3, 1, 2)
        return out.view(*x.shape[:-1], geometry[6])


class RealQuantLayer(_RealWeights, QuantLayer):
    """Direct W8A8 or W4A8 on the real backend: o = s_a s_w (codes of a) @ (codes of W - z) + b."""

    def forward(self, x: Tensor) -> Tensor:
        if not use_real_kernels(x):
            return super().forward(x)
        x = _nhwc(x)
        geometry = self._geometry(x)
        out = real_direct(x, self.weight_packed, self.weight_scale_n, self.bias, geometry, _output_dtype(x),
                          self.weight_offset_n)
        return self._shaped(out, x, geometry)


class RealModulatedLayer(_RealWeights, ModulatedLayer):
    """MoDiff W8A8 or W4A8 on the real backend: r = a - a_hat, a_hat += Q(r), o_hat += A_q(Q(r)); returns o_hat. Under
    autocast a is the input in the autocast dtype, as in the simulator (`consumed`)."""

    product_of_operands = False  # on the kernels its forward multiplies the residual's codes, not linear_operands

    def input_state_key(self) -> None:
        """Never shared: the real kernels keep each layer's codes and o_hat beside a_hat."""
        return None

    def _float32_output(self, x: Tensor) -> Tensor:
        """A_q(a) + b in float32, outside autocast: o_hat's start. The steps after it add exact integer products
        to o_hat and never correct it, so a start rounded to bf16 would stay in every later output (measured:
        benchmarks/README.md, "Real W8A8 MoDiff", teacher-forced errors)."""
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return self.op(x.float(), self.weight_q.float(), bias)

    def forward(self, x: Tensor) -> Tensor:
        if not use_real_kernels(x):
            return super().forward(x)
        self._check_call(x)
        state = self.state
        phase, state.phase = state.phase, "spent"
        x = _nhwc(x)
        if phase == "warmup":  # full-precision activations; copies: layers sharing an input must not share state
            dtype = _REAL_AUTO_STATE if self.config.state_dtype == "auto" else state_dtype(x, self.config.state_dtype)
            state.a_hat = state.a_ref = x.to(dtype, copy=True)
            exact = self._float32_output(x)
            state.o_hat = _nhwc(exact.to(dtype, copy=True))
            return exact.to(_output_dtype(x))
        x = consumed(x)  # the residual against what the operator consumes, as in the simulator
        geometry = self._geometry(x)
        out = real_modulated(x, state.a_hat, state.o_hat, self.weight_packed, self.weight_scale_n, geometry,
                             _output_dtype(x), self.weight_offset_n)
        return self._shaped(out, x, geometry)
