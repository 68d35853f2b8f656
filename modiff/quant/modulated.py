"""Cross-step MoDiff state and the `trajectory()` context that owns it.

Each modulated/cached layer keeps a_hat (input-shaped) and o_hat (output-shaped) per sample, and counts
its calls (one call = one sampling step; the first `warmup_steps` calls run on full-precision
activations). The state exists only inside `with trajectory(qmodel):`; it is created on entry and
cleared on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from modiff.quant.config import ResetPolicy, _check

__all__ = ["LayerState", "trajectory", "state_bytes"]


@dataclass
class LayerState:
    a_hat: Optional[torch.Tensor] = None  # (B, C_in, ...) quantized-input estimate (exact input without EC)
    o_hat: Optional[torch.Tensor] = None  # (B, C_out, ...) output estimate, bias included
    calls: int = 0

    def clear(self) -> None:
        self.a_hat = self.o_hat = None
        self.calls = 0


def _stateful_layers(model: nn.Module) -> list[nn.Module]:
    from modiff.quant.modules import ModulatedLayer

    return [m for m in model.modules() if isinstance(m, ModulatedLayer)]


@contextlib.contextmanager
def trajectory(model: nn.Module, reset: Optional[ResetPolicy] = None) -> Iterator[list[LayerState]]:
    """Give every modulated/cached layer of `model` fresh state for one sampling trajectory.

    reset: ``per_trajectory`` (default from the config): state persists across the model calls of the
    block. ``per_step``: the state is cleared before every model call, so every call is a warm-up call on
    full-precision activations; this is the published CIFAR-10 loop, offered only to measure its effect.
    """
    layers = _stateful_layers(model)
    if not layers:
        raise ValueError("the model has no modulated or cached layers; trajectory() is only needed for those")
    policy = reset or layers[0].config.reset
    _check(policy, ResetPolicy, "reset")
    if any(layer.state is not None for layer in layers):
        raise RuntimeError("trajectory() is already active for this model; nesting is not allowed")
    states = [LayerState() for _ in layers]

    def clear_all(_module: nn.Module, _args: tuple) -> None:
        for state in states:
            state.clear()

    hook = model.register_forward_pre_hook(clear_all) if policy == "per_step" else None
    try:
        for layer, state in zip(layers, states):
            layer.state = state
        yield states
    finally:
        if hook is not None:
            hook.remove()
        for layer, state in zip(layers, states):
            layer.state = None
            state.clear()


def state_bytes(states: list[LayerState]) -> int:
    """Bytes held by a_hat and o_hat over all layers (for the whole batch)."""
    total = 0
    for s in states:
        for t in (s.a_hat, s.o_hat):
            if t is not None:
                total += t.numel() * t.element_size()
    return total
