"""The MoDiff layer: a QuantLayer in mode ``modulated`` or ``cache``, with state across sampling steps.

Notation as in `modiff.quant.layers.direct`: A the layer's linear operator with quantized weights (bias
separate), a_t its input at step t, Q the activation quantizer, a_hat / o_hat the MoDiff input / output
estimates (o_hat = A(a_hat) + b, the error-feedback identity), a_ref the next residual's reference.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from modiff.quant.config import QuantConfig
from modiff.quant.kernels.modulate import (fused_spec_supported, fused_tensors_supported, launch_modulate,
                                           use_fused_modulate)
from modiff.quant.layers.direct import ActQuantizer, QuantLayer, quantize_dynamic_split
from modiff.quant.layers.state import LayerState
from modiff.quant.primitives import Grid, QuantSpec

__all__ = ["ModulatedLayer", "modulate", "state_dtype"]


def _modulate(x: torch.Tensor, a_hat: torch.Tensor, a_ref: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor],
              compensation: bool) -> None:
    """One MoDiff step on the input side, in place: a_hat += Q(a_t - a_ref) (computed in float32).

    With error compensation a_ref is a_hat itself; without it a_ref then holds the exact a_t. The state keeps
    its addresses, so a CUDA graph of the network can replay the step (`modiff.pipelines.cuda_graphs`).
    """
    residual = x.float() - a_ref.float()
    a_hat.copy_(a_hat.float() + quantize(residual))
    if not compensation:
        a_ref.copy_(x)


def _modulate_dynamic(x: torch.Tensor, a_hat: torch.Tensor, a_ref: torch.Tensor, spec: Optional[QuantSpec],
                      split: Optional[int], compensation: bool, grid: Optional[Grid] = None) -> None:
    quantize = (lambda r: r) if spec is None else partial(quantize_dynamic_split, spec=spec, split=split, grid=grid)
    _modulate(x, a_hat, a_ref, quantize, compensation)


_COMPILED: dict[str, Callable[..., None]] = {}


def modulate(x: torch.Tensor, a_hat: torch.Tensor, a_ref: torch.Tensor, act: Optional[ActQuantizer],
             compensation: bool, fused_spec: Optional[bool] = None) -> None:
    """Advance a modulated layer's state (a_hat, a_ref) in place from its input a_t (see `_modulate`).

    On CUDA, per-sample dynamic quantizers run as two Triton kernels (`modiff.quant.kernels.modulate`:
    the ranges over chunks of every sample in parallel, then the quantized update), also inside a compiled
    network. Other dynamic quantizers run eagerly as one compiled kernel per structure (scheme, granularity,
    split; the bit width is data, `act.grid`): subtraction, range reduction, quantization and the a_hat
    update fused; inside a compiled network the surrounding graph fuses them. No host synchronisation on any
    path. ``fused_spec``: `fused_spec_supported(act.spec)`, as the layer asked it when it was built.
    """
    if act is not None and (act.observing or not act.config.dynamic or act.format != "int"):
        return _modulate(x, a_hat, a_ref, act, compensation)
    spec, split, grid = (None, None, None) if act is None else (act.spec, act.split, act.grid)
    a_ref_distinct = None if compensation else a_ref
    if fused_spec is None:
        fused_spec = fused_spec_supported(spec)
    if fused_spec and use_fused_modulate(x) and fused_tensors_supported(x, a_hat, a_ref_distinct):
        launch_modulate(x, a_hat, a_ref_distinct, spec, split, grid)
        if not compensation:
            a_ref.copy_(x)
        return None
    if not x.is_cuda or torch.compiler.is_compiling():
        return _modulate_dynamic(x, a_hat, a_ref, spec, split, compensation, grid)
    if "modulate" not in _COMPILED:
        _COMPILED["modulate"] = torch.compile(_modulate_dynamic, dynamic=True)
    return _COMPILED["modulate"](x, a_hat, a_ref, spec, split, compensation, grid)


_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def state_dtype(x: torch.Tensor, choice: str = "auto") -> torch.dtype:
    """The dtype of the MoDiff state: ``choice`` (`QuantConfig.state_dtype`), or for "auto" the dtype the
    layer's operator consumes: the autocast dtype where autocast is on, else x's dtype."""
    if choice != "auto":
        return _STATE_DTYPES[choice]
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def consumed(x: torch.Tensor) -> torch.Tensor:
    """x as the layer's operator consumes it: in the autocast dtype where autocast is on (bf16 on the fast path).
    The residual is then formed against the values the product sees, and a compiled network writes x once in
    that dtype rather than in the float32 its producer (GroupNorm, swish) computes in under autocast (the
    measured gain: benchmarks/README.md, "Full-precision sampling", sitting 28)."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


class ModulatedLayer(QuantLayer):
    """A QuantLayer in mode ``modulated`` or ``cache``: MoDiff state across steps (see trajectory()).

    The output is computed through the error-feedback identity o_hat_t = A_q(a_hat_t) + b, with
    a_hat_t = a_hat_{t+1} + Q(r_t). By induction it equals the accumulated form of the paper,
    o_hat_t = o_hat_{t+1} + A_q(Q(r_t)) with o_hat at warm-up = A_q(a) + b (tests pin it step by step),
    up to float rounding. Keeping a_hat alone, in the dtype the operator consumes (bf16 under autocast),
    moves a quarter of the bytes per step that keeping a_hat and o_hat in float32 does: the storage
    rounding enters the next residual, so error feedback corrects it too. Memory accounting of a real
    low-bit deployment (a_hat and o_hat) is in `modiff.quant.cost.modiff_state_bytes`.

    The forward reads the phase that trajectory() set for this call and has no Python-side counters, so
    torch.compile traces it whole and fuses the state update with the surrounding graph. The state is
    allocated at warm-up and updated in place after it: its addresses stay fixed for the rest of the
    trajectory, so a CUDA graph captured at one step replays the next (`modiff.pipelines.cuda_graphs`).
    """

    stateful = True
    product_of_operands = True  # forward(x) is self.op(*self.linear_operands(x)): see `linear_operands`

    def __init__(self, layer: nn.Module, config: QuantConfig, name: str, split: Optional[int] = None):
        super().__init__(layer, config, name, split)
        self.state = LayerState()
        # asked once, here: a compiled forward then never reads the bit width (see `modulate`)
        self.fused_spec = config.format == "int" and fused_spec_supported(None if self.act is None else self.act.spec)

    def _check_call(self, x: torch.Tensor) -> None:
        phase = self.state.phase
        if phase == "inactive":
            raise RuntimeError(
                f"layer {self.name} is {self.config.mode}: it keeps state across sampling steps; call the "
                f"model inside `with modiff.trajectory(qmodel):`"
            )
        if phase == "spent":
            raise RuntimeError(
                f"layer {self.name} ran twice in one step: inside trajectory(model), call `model` itself once per "
                f"sampling step (not a submodule of it)"
            )
        if phase != "warmup" and x.shape != self.state.a_hat.shape:
            raise RuntimeError(
                f"layer {self.name}: input shape {tuple(x.shape)} differs from the previous step's "
                f"{tuple(self.state.a_hat.shape)}; the batch must stay the same within one trajectory"
            )

    def input_state_key(self) -> Optional[tuple]:
        """What decides how this layer's a_hat and a_ref follow its input, or None where they also depend on
        the layer itself (static ranges learned per layer, observers collecting). Two layers with one key that
        read one tensor keep identical states, so `trajectory()` lets the second read the first one's."""
        act, config = self.act, self.config
        if act is not None and (act.observing or not act.config.dynamic):
            return None
        act_key = None if act is None else (act.config, act.split, act.format)
        return (type(self), config.mode, config.compensation, config.warmup_steps, config.cache_interval,
                config.reset, config.state_dtype, act_key)

    def _read_shared_state(self, phase: str) -> None:
        leader = self.state.shared_with
        if leader.phase != "spent":
            raise RuntimeError(
                f"layer {self.name} shares its input's MoDiff state with a layer that has not run in this step; "
                f"the module declaring them in `shared_input` must call them in that order")
        if phase == "warmup":
            self.state.a_hat, self.state.a_ref = leader.a_hat, leader.a_ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(*self.linear_operands(x))

    def linear_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Advance the state from the input x of this step; return what the operator takes: (a_hat, A_q's
        weights, b), so that forward(x) is self.op(*linear_operands(x)). Layers reading one tensor through a
        shared state return one a_hat, which `modiff.models.ddim_unet.pointwise_projections` multiplies once."""
        self._check_call(x)
        state, compensation = self.state, self.config.compensation
        phase, state.phase = state.phase, "spent"
        if state.shared_with is not None:  # the first layer reading x has advanced a_hat as this one would
            self._read_shared_state(phase)
        elif phase == "warmup":  # a copy: x may be another layer's input, and a_hat is updated in place
            state.a_hat = x.to(state_dtype(x, self.config.state_dtype), copy=True)
            state.a_ref = state.a_hat if compensation else state.a_hat.clone()
        elif phase == "skip":
            if not compensation:  # the skipped residual is dropped: no error feedback
                state.a_ref.copy_(x)
        else:
            modulate(consumed(x), state.a_hat, state.a_ref, self.act, compensation, self.fused_spec)
        return self.operand(x), self.weight_q, self.bias

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """a_hat as the operator takes it: in x's dtype when the state has another (`QuantConfig.state_dtype`)
        and no autocast converts it."""
        a_hat = self.state.a_hat
        if a_hat.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a_hat = a_hat.to(x.dtype)
        return a_hat
