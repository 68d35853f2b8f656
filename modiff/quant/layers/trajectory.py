"""Cross-step MoDiff state and the `trajectory()` context that owns it.

Each modulated/cached layer keeps a_hat (input-shaped; its output is o_hat = A_q(a_hat) + b) and, without
error compensation, a_ref (the previous exact input, the reference of the next residual), and counts
model calls (one call = one sampling step; the first `warmup_steps` calls run on full-precision
activations). The state is live only inside `with trajectory(qmodel):`; it is cleared on exit, also after
an exception.

The step bookkeeping runs in a forward pre-hook on the model passed to `trajectory()`, outside any compiled
graph: it sets each layer's `phase` for the coming call. The layers only read their phase and tensors, so a
compiled network keeps the modulated layers (residual, quantization, state update) inside its
graph; it compiles once per distinct phase pattern (warm-up, refresh, cache skip), not once per step.
The layers allocate their state at warm-up and update it in place after it, so a CUDA graph recorded at
one step can replay the next (`modiff.pipelines.cuda_graphs`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from modiff.quant.config import ResetPolicy, _check
from modiff.quant.kernels.modulate import register_op
from modiff.quant.layers.modulated import ModulatedLayer
from modiff.quant.layers.state import LayerState

__all__ = ["replay_signature", "state_bytes", "stateful_layers", "trajectory"]

def stateful_layers(model: nn.Module) -> list[nn.Module]:
    """The modulated and cached layers of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, ModulatedLayer)]


def replay_signature(layers: list[nn.Module]) -> Optional[tuple[tuple[str, int, int], ...]]:
    """What a CUDA graph of the coming model call reads of the layers' state: each layer's phase and the
    addresses of a_hat and a_ref. None when the call allocates state (warm-up) or must raise (outside
    trajectory(), or the layer already ran this step): such a call cannot be replayed."""
    signature = []
    for layer in layers:
        state = layer.state
        if state.phase not in ("refresh", "skip") or state.a_hat is None:
            return None
        signature.append((state.phase, state.a_hat.data_ptr(), state.a_ref.data_ptr()))
    return tuple(signature)


@contextlib.contextmanager
def trajectory(model: nn.Module, reset: Optional[ResetPolicy] = None) -> Iterator[list[LayerState]]:
    """Give every modulated/cached layer of `model` fresh state for one sampling trajectory.

    Every call of `model` inside the block is one sampling step (call `model`, not a submodule of it).
    reset: ``per_trajectory`` (default from the config): state persists across the model calls of the
    block. ``per_step``: the state is cleared before every model call, so every call is a warm-up call on
    full-precision activations; this is the published CIFAR-10 loop, offered only to measure its effect.
    """
    layers = stateful_layers(model)
    if not layers:
        raise ValueError("the model has no modulated or cached layers; trajectory() is only needed for those")
    policy = reset or layers[0].config.reset
    _check(policy, ResetPolicy, "reset")
    if any(layer.state.phase != "inactive" for layer in layers):
        raise RuntimeError("trajectory() is already active for this model; nesting is not allowed")
    states = [layer.state for layer in layers]
    if any(layer.act is not None and layer.act.config.dynamic and layer.act.spec.granularity == "sample"
           for layer in layers):
        register_op()  # eagerly, before a compiled graph reads it (`modulate` takes it on CUDA)

    @torch.compiler.disable  # Python bookkeeping: never traced, so graphs do not specialise on step counts
    def next_step(_module: nn.Module, _args: tuple) -> None:
        for layer in layers:
            if policy == "per_step":
                layer.state.clear()
            layer.state.advance(layer.config)

    for state in states:
        state.clear()
        state.phase = "spent"
    hook = model.register_forward_pre_hook(next_step)
    try:
        yield states
    finally:
        hook.remove()
        for state in states:
            state.clear()
            state.phase = "inactive"


def state_bytes(states: list[LayerState]) -> int:
    """Bytes of state the simulator holds over all layers (for the whole batch; a_ref counted when distinct)."""
    tensors = {id(t): t for s in states for t in (s.a_hat, s.a_ref) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())
