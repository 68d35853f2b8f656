"""Quantized layer wrappers: Conv1d/Conv2d/Linear, and the attention core.

Notation (paper symbols): A the layer's linear operator with quantized weights (bias separate), a_t its
input at sampling step t, Q the activation quantizer, a_hat / o_hat the MoDiff input / output estimates.
Shapes: a (B, C_in, ...), o (B, C_out, ...).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from modiff.quant.config import ActQuant, QuantConfig, WeightQuant
from modiff.quant.modulated import LayerState
from modiff.quant.observers import make_observer
from modiff.quant.primitives import QuantSpec, fake_quantize, quantize_dynamic, weight_qparams

__all__ = ["ActQuantizer", "ModulatedLayer", "QuantLayer", "QuantAttentionCore", "quantize_weight", "residual_step"]


def _split(x: torch.Tensor, split: Optional[int]) -> list[torch.Tensor]:
    return [x] if split is None else list(x.split([split, x.shape[1] - split], dim=1))


def quantize_weight(weight: torch.Tensor, config: WeightQuant, split: Optional[int] = None) -> torch.Tensor:
    """Fake-quantized weight, per output channel; with `split`, the two input-channel halves separately."""
    parts = []
    for w in _split(weight, split):
        scale, zero_point = weight_qparams(w, config.spec, method=config.method)
        parts.append(fake_quantize(w, scale, zero_point, config.spec))
    return torch.cat(parts, dim=1)


class ActQuantizer(nn.Module):
    """Q for a layer's input (or residual). With `split`, the two channel halves get separate qparams.

    Static quantizers learn their qparams while `observing` is set: inputs pass through unchanged and
    every observer sees them; `freeze()` turns the observations into qparams.
    """

    def __init__(self, config: ActQuant, split: Optional[int] = None):
        super().__init__()
        self.config, self.split = config, split
        self.observing = False
        self.observers = [make_observer(config.observer, spec=config.spec) for _ in range(1 if split is None else 2)]
        self.scales: list[torch.Tensor] = []
        self.zero_points: list[torch.Tensor] = []

    @property
    def spec(self) -> QuantSpec:
        return self.config.spec

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
            return quantize_dynamic_split(x, self.spec, self.split)
        if not self.scales:
            raise RuntimeError("static activation quantizer has no qparams: run modiff.calibrate(...) first")
        out = [fake_quantize(p, s, z, self.spec) for p, s, z in zip(parts, self.scales, self.zero_points)]
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


def quantize_dynamic_split(x: torch.Tensor, spec: QuantSpec, split: Optional[int]) -> torch.Tensor:
    """Dynamic Q of x, with the two channel halves quantized separately when `split` is set."""
    parts = [quantize_dynamic(p, spec) for p in _split(x, split)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _fused_residual_step(x: torch.Tensor, a_hat: torch.Tensor, spec: Optional[QuantSpec], split: Optional[int],
                         compensation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    residual = x - a_hat
    q = residual if spec is None else quantize_dynamic_split(residual, spec, split)
    return q, (a_hat + q if compensation else x)


_COMPILED: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def residual_step(x: torch.Tensor, a_hat: torch.Tensor, act: Optional[ActQuantizer],
                  compensation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """r = a_t - a_hat, q = Q(r); returns q and the next a_hat (a_hat + q with error feedback, else a_t).

    For dynamic quantizers on CUDA this is one compiled kernel per (spec, split): subtraction, range
    reduction, quantization and the a_hat update fused, with no host synchronisation.
    """
    if act is not None and (act.observing or not act.config.dynamic):
        x = x.float()
        q = act(x - a_hat)
        return q, (a_hat + q if compensation else x)
    spec, split = (None, None) if act is None else (act.spec, act.split)
    if not x.is_cuda:
        return _fused_residual_step(x, a_hat, spec, split, compensation)
    if "residual" not in _COMPILED:
        _COMPILED["residual"] = torch.compile(_fused_residual_step, dynamic=True)
    return _COMPILED["residual"](x, a_hat, spec, split, compensation)


class QuantLayer(nn.Module):
    """A Conv1d/Conv2d/Linear computing in the mode of its QuantConfig (see modiff.quant.config)."""

    def __init__(self, layer: nn.Module, config: QuantConfig, name: str, split: Optional[int] = None):
        super().__init__()
        self.name, self.config, self.kind = name, config, type(layer).__name__
        self.op = _linear_op(layer)
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        w_q = self.weight if config.weight is None else quantize_weight(self.weight, config.weight, split)
        self.register_buffer("weight_q", w_q.detach().clone())
        self.act = None if config.activation is None else ActQuantizer(config.activation, split)
        if config.stateful != isinstance(self, ModulatedLayer):
            raise TypeError(f"mode {config.mode!r} needs {'ModulatedLayer' if config.stateful else 'QuantLayer'}; "
                            f"modiff.quantize picks the right one")

    def extra_repr(self) -> str:
        w = "fp" if self.config.weight is None else f"w{self.config.weight.spec.bits}"
        a = "fp" if self.config.activation is None else f"a{self.config.activation.spec.bits}"
        return f"{self.kind}, {self.config.mode}, {w}{a}"

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else self.act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.config.mode
        if mode == "fp":
            return self.op(x, self.weight, self.bias)
        return self.op(self._quantize_input(x), self.weight_q, self.bias)


class ModulatedLayer(QuantLayer):
    """A QuantLayer in mode ``modulated`` or ``cache``: MoDiff state across steps (see trajectory()).

    Its forward runs outside any compiled graph (the step counter and the state change every call),
    so a compiled model breaks its graph here; the residual update is its own fused kernel.
    """

    def __init__(self, layer: nn.Module, config: QuantConfig, name: str, split: Optional[int] = None):
        super().__init__(layer, config, name, split)
        self.state: Optional[LayerState] = None

    def _refreshes(self, step: int) -> bool:
        """Whether this step quantizes its residual (True) or skips it as 0 bits (cache mode)."""
        return self.config.mode != "cache" or step % self.config.cache_interval == 0

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The state stays float32 under bf16 autocast: o_hat sums the increments of every step.
        state = self.state
        if state is None:
            raise RuntimeError(
                f"layer {self.name} is {self.config.mode}: it keeps state across sampling steps; call the "
                f"model inside `with modiff.trajectory(qmodel):`"
            )
        step = state.calls
        state.calls += 1
        if step < self.config.warmup_steps:
            state.a_hat = x.float()
            state.o_hat = self.op(x, self.weight_q, self.bias).float()
            return state.o_hat
        if x.shape != state.a_hat.shape:
            raise RuntimeError(
                f"layer {self.name}: input shape {tuple(x.shape)} differs from the previous step's "
                f"{tuple(state.a_hat.shape)}; the batch must stay the same within one trajectory"
            )
        if not self._refreshes(step):
            if not self.config.compensation:
                state.a_hat = x.float()  # the skipped residual is dropped: no error feedback
            return state.o_hat
        q, state.a_hat = residual_step(x, state.a_hat, self.act, self.config.compensation)
        state.o_hat = state.o_hat + self.op(q, self.weight_q, None).float()
        return state.o_hat


class QuantAttentionCore(nn.Module):
    """Q-Diffusion-style attention: q, k, v and the softmax output quantized (dynamic, per sample)."""

    def __init__(self, bits: int):
        super().__init__()
        self.spec = QuantSpec(bits=bits, granularity="sample")
        self.softmax_spec = QuantSpec(bits=bits, granularity="sample", scheme="asymmetric")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = q.shape
        q, k, v = (quantize_dynamic(t, self.spec).reshape(b, c, hh * ww) for t in (q, k, v))
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (B, HW_q, HW_k)
        weights = quantize_dynamic(weights, self.softmax_spec)
        return torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
