"""Quantized layer wrappers: Conv1d/Conv2d/Linear, and the attention core.

Notation (paper symbols): A the layer's linear operator with quantized weights (bias separate), a_t its
input at sampling step t, Q the activation quantizer, a_hat / o_hat the MoDiff input / output estimates
(o_hat = A(a_hat) + b, the error-feedback identity).
Shapes: a (B, C_in, ...), o (B, C_out, ...).

Bit widths are data: every activation quantizer keeps its grid (`modiff.quant.primitives.quant_grid`) as
buffers and the forward passes never read a bit width from the config, so a compiled network serves every
bit width with one graph. What they branch on (mode, scheme, granularity, split, dynamic or static) is
the structure of the computation.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from modiff.quant.config import ActQuant, QuantConfig, WeightMethod, WeightQuant
from modiff.quant.formats import NumberFormat, fake_quantize_fp8, fp8_scale, quantize_dynamic_fp8
from modiff.quant.observers import make_observer
from modiff.quant.primitives import (Grid, QuantSpec, fake_quantize, quant_grid, quantize_dynamic, reduce_range,
                                     weight_qparams)

__all__ = ["ActQuantizer", "QuantLayer", "QuantAttentionCore", "quantize_dynamic_split", "quantize_weight", "weight_grid",
           "register_grid", "module_grid"]


def register_grid(module: nn.Module, prefix: str, spec: QuantSpec) -> None:
    """Keep ``spec``'s grid on ``module`` as non-persistent buffers (they follow the module to its device)."""
    for field, value in zip(Grid._fields, quant_grid(spec)):
        module.register_buffer(f"{prefix}_{field}", value, persistent=False)


def module_grid(module: nn.Module, prefix: str) -> Grid:
    """The grid `register_grid` kept under ``prefix``."""
    return Grid(*(getattr(module, f"{prefix}_{field}") for field in Grid._fields))


def _split(x: torch.Tensor, split: Optional[int]) -> list[torch.Tensor]:
    return [x] if split is None else list(x.split([split, x.shape[1] - split], dim=1))


def _fp8_weight_qparams(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale = fp8_scale(*reduce_range(weight.detach(), spec))
    return scale, torch.zeros_like(scale)


def weight_grid(weight: torch.Tensor, config: WeightQuant, split: Optional[int] = None,
                method: Optional[WeightMethod] = None, p: float = 2.0,
                format: NumberFormat = "int") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of every weight's grid, broadcastable against ``weight``.

    Per output channel: shape (out, 1, ...); with `split`, the two input-channel halves get their own
    qparams, expanded to (out, in, ...) so one tensor describes both. ``method``/``p`` override the
    config's range method (AdaRound starts from the Lp search of Q-Diffusion, p = 2.4). ``format``
    "fp8_e4m3": min-max scales absmax / 448 (`modiff.quant.formats`), zero points 0.
    """
    parts = _split(weight, split)
    if format == "fp8_e4m3":
        grids = [_fp8_weight_qparams(w, config.spec) for w in parts]
    else:
        grids = [weight_qparams(w, config.spec, method=method or config.method, p=p) for w in parts]
    if len(grids) == 1:
        return grids[0]
    scale = torch.cat([s.expand(-1, w.shape[1], *s.shape[2:]) for (s, _), w in zip(grids, parts)], dim=1)
    zero_point = torch.cat([z.expand(-1, w.shape[1], *z.shape[2:]) for (_, z), w in zip(grids, parts)], dim=1)
    return scale, zero_point


def quantize_weight(weight: torch.Tensor, config: WeightQuant, split: Optional[int] = None) -> torch.Tensor:
    """Fake-quantized weight, per output channel; with `split`, the two input-channel halves separately."""
    scale, zero_point = weight_grid(weight, config, split)
    return fake_quantize(weight, scale, zero_point, config.spec)


class ActQuantizer(nn.Module):
    """Q for a layer's input (or residual). With `split`, the two channel halves get separate qparams.

    Static quantizers learn their qparams while `observing` is set: inputs pass through unchanged and
    every observer sees them; `freeze()` turns the observations into qparams. The qparams are plain float32
    tensors that move with the module (`.to`, `.cuda`) and are never replaced by a call, so a compiled or
    CUDA-graphed network reads them where they were when it was recorded.
    """

    def __init__(self, config: ActQuant, split: Optional[int] = None, format: NumberFormat = "int"):
        super().__init__()
        self.config, self.split, self.format = config, split, format
        self.observing = False
        self.observers = [make_observer(config.observer, spec=config.spec) for _ in range(1 if split is None else 2)]
        self.scales: list[torch.Tensor] = []
        self.zero_points: list[torch.Tensor] = []
        register_grid(self, "grid", config.spec)

    @property
    def spec(self) -> QuantSpec:
        return self.config.spec

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "ActQuantizer":
        """Move the qparams with the module, as buffers move, but keep their dtype (float32: the minimum
        scale underflows in fp16): of ``fn``'s result only the device is taken."""
        super()._apply(fn, recurse)
        with torch.no_grad():
            self.scales = [s.to(fn(s).device) for s in self.scales]
            self.zero_points = [z.to(fn(z).device) for z in self.zero_points]
        return self

    @property
    def grid(self) -> Grid:
        return module_grid(self, "grid")

    def freeze(self) -> None:
        """Static qparams from what the observers saw."""
        qparams = [obs.qparams(self.spec) for obs in self.observers]
        self.scales = [s.float() for s, _ in qparams]  # float32: the minimum scale underflows in fp16
        self.zero_points = [z.float() for _, z in qparams]
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = _split(x, self.split)
        if self.observing:
            for obs, part in zip(self.observers, parts):
                obs.update(part.detach())
            return x
        if self.config.dynamic:
            if self.format == "fp8_e4m3":
                return quantize_dynamic_fp8(x, self.spec, self.split)
            return quantize_dynamic_split(x, self.spec, self.split, self.grid)
        if not self.scales:
            raise RuntimeError("static activation quantizer has no qparams: calibrate first "
                               "(modiff.quant.ptq.calibrate, or modiff.quant.load_quantized for a saved model)")
        if self.scales[0].device != x.device:
            raise RuntimeError(f"static activation qparams are on {self.scales[0].device}, the input on {x.device}: "
                               f"move the model with .to(device), which moves them too")
        grid = self.grid
        out = [fake_quantize(p, s, z, self.spec, grid) for p, s, z in zip(parts, self.scales, self.zero_points)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def _linear_op(layer: nn.Module) -> Callable[..., torch.Tensor]:
    if isinstance(layer, nn.Linear):
        return F.linear
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.padding_mode != "zeros":
            raise TypeError(f"only zero-padded convolutions are supported, got padding_mode={layer.padding_mode!r}")
        conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        return partial(conv, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    raise TypeError(f"cannot quantize {type(layer).__name__}; supported: Conv1d, Conv2d, Linear")


def quantize_dynamic_split(x: torch.Tensor, spec: QuantSpec, split: Optional[int],
                           grid: Optional[Grid] = None) -> torch.Tensor:
    """Dynamic Q of x, with the two channel halves quantized separately when `split` is set; ``grid``
    replaces the bit width of ``spec`` (see `modiff.quant.primitives.quant_grid`)."""
    parts = [quantize_dynamic(p, spec, grid) for p in _split(x, split)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QuantLayer(nn.Module):
    """A Conv1d/Conv2d/Linear computing in the mode of its QuantConfig (see modiff.quant.config)."""

    stateful = False  # ModulatedLayer: state across sampling steps

    def __init__(self, layer: nn.Module, config: QuantConfig, name: str, split: Optional[int] = None):
        super().__init__()
        self.name, self.config, self.kind = name, config, type(layer).__name__
        self.op = _linear_op(layer)
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.split = split
        grid = (None, None) if config.weight is None else weight_grid(self.weight, config.weight, split,
                                                                      format=config.format)
        # The grid of weight_q, kept (not in the state_dict) so weight codes can be saved and replaced.
        self.register_buffer("weight_scale", grid[0], persistent=False)
        self.register_buffer("weight_zero_point", grid[1], persistent=False)
        if config.weight is None:
            w_q = self.weight
        elif config.format == "fp8_e4m3":
            w_q = fake_quantize_fp8(self.weight, grid[0])
        else:
            w_q = fake_quantize(self.weight, grid[0], grid[1], config.weight.spec)
        self.register_buffer("weight_q", w_q.detach().clone())
        self.rounding: Optional[nn.Module] = None  # AdaRound's soft weights replace weight_q while it is set
        self.act = None if config.activation is None else ActQuantizer(config.activation, split, config.format)
        if config.stateful != self.stateful:
            raise TypeError(f"mode {config.mode!r} needs {'ModulatedLayer' if config.stateful else 'QuantLayer'}; "
                            f"modiff.quantize picks the right one")

    def extra_repr(self) -> str:
        w = "fp" if self.config.weight is None else f"w{self.config.weight.spec.bits}"
        a = "fp" if self.config.activation is None else f"a{self.config.activation.spec.bits}"
        fmt = "" if self.config.format == "int" else f" {self.config.format}"
        return f"{self.kind}, {self.config.mode}, {w}{a}{fmt}, {self.config.backend}"

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else self.act(x)

    def weight_codes(self) -> torch.Tensor:
        """Integer codes q of weight_q = s (q - z), as a float tensor (exact: |q - z| < 2^16)."""
        if self.weight_scale is None or self.config.weight is None:
            raise ValueError(f"layer {self.name} has full-precision weights; it has no weight codes")
        if self.config.format != "int":
            raise ValueError(f"layer {self.name} has {self.config.format} weights: its values are not integer codes")
        spec = self.config.weight.spec
        code = torch.round(self.weight_q.float() * self.weight_scale.reciprocal()) + self.weight_zero_point
        return torch.clamp(code, spec.qmin, spec.qmax)

    def set_weight_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix weight_q = s (q - z) from integer codes (AdaRound's decisions, or a saved model)."""
        if codes.shape != self.weight.shape:
            raise ValueError(f"layer {self.name}: codes of shape {tuple(codes.shape)} for a weight of shape "
                             f"{tuple(self.weight.shape)}")
        dev = self.weight.device
        self.weight_scale, self.weight_zero_point = scale.to(dev, torch.float32), zero_point.to(dev, torch.float32)
        w_q = (codes.to(dev, torch.float32) - self.weight_zero_point) * self.weight_scale
        self.weight_q = w_q.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.config.mode
        if mode == "fp":
            return self.op(x, self.weight, self.bias)
        weight = self.weight_q if self.rounding is None else self.rounding()
        return self.op(self._quantize_input(x), weight, self.bias)


class QuantAttentionCore(nn.Module):
    """Attention with q, k, v and the softmax output quantized, dynamically per sample at one bit width (not
    Q-Diffusion's scheme: static per-tensor scales, q, k, v at the activation bits, the softmax at ``sm_abit``)."""

    def __init__(self, bits: int):
        super().__init__()
        self.spec = QuantSpec(bits=bits, granularity="sample")
        self.softmax_spec = QuantSpec(bits=bits, granularity="sample", scheme="asymmetric")
        register_grid(self, "grid", self.spec)
        register_grid(self, "softmax_grid", self.softmax_spec)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = q.shape
        grid = module_grid(self, "grid")
        q, k, v = (quantize_dynamic(t, self.spec, grid).reshape(b, c, hh * ww) for t in (q, k, v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (B, HW_q, HW_k)
        weights = quantize_dynamic(weights, self.softmax_spec, module_grid(self, "softmax_grid"))
        return torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
