"""Cross-step MoDiff state and the `trajectory()` context that owns it.

Each modulated/cached layer keeps a_hat (input-shaped; its output is o_hat = A_q(a_hat) + b) and, without
error compensation, a_ref (the previous exact input, the reference of the next residual), and counts
model calls (one call = one sampling step; the first `warmup_steps` calls run on full-precision
activations). The state is live only inside `with trajectory(qmodel):`; it is cleared on exit, also after
an exception.

The step bookkeeping runs in a pre-forward hook (`TrajectoryHook`, `modiff.utils.hooks`) on the model passed to
`trajectory()`, outside any compiled graph: it sets each layer's `phase` for the coming call. The layers only read their phase and tensors, so a
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
from modiff.utils.hooks import ModelHook, attach

__all__ = ["HOOK_NAME", "TrajectoryHook", "replay_signature", "shared_input_pairs", "state_bytes", "stateful_layers",
           "trajectory"]

HOOK_NAME = "modiff.trajectory"

def stateful_layers(model: nn.Module) -> list[nn.Module]:
    """The modulated and cached layers of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, ModulatedLayer)]


def shared_input_pairs(model: nn.Module) -> list[tuple[ModulatedLayer, ModulatedLayer]]:
    """(follower, leader) pairs of layers whose input-side state is one: children a module names in its
    ``shared_input`` attribute (they read one tensor, in that order, at every call) with equal
    `ModulatedLayer.input_state_key`. The first of each key leads; the others read its a_hat and a_ref."""
    pairs = []
    for module in model.modules():
        leaders: dict[tuple, ModulatedLayer] = {}
        for name in getattr(module, "shared_input", ()):
            layer = getattr(module, name, None)
            key = layer.input_state_key() if isinstance(layer, ModulatedLayer) else None
            if key is None:
                continue
            if key in leaders:
                pairs.append((layer, leaders[key]))
            else:
                leaders[key] = layer
    return pairs


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


class TrajectoryHook(ModelHook):
    """Before every model call (one sampling step), sets the phase of each stateful layer for that call.

    Python bookkeeping outside any compiled graph, so graphs do not specialise on step counts.
    `reset_state` clears every layer's state (a fresh trajectory; the phase waits for the next call).
    """

    def __init__(self, layers: list[ModulatedLayer], policy: ResetPolicy):
        self.layers, self.policy = layers, policy

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: tuple) -> None:
        for layer in self.layers:
            if self.policy == "per_step":
                layer.state.clear()
            layer.state.advance(layer.config)

    def reset_state(self) -> None:
        for layer in self.layers:
            layer.state.clear()
            layer.state.phase = "spent"


@contextlib.contextmanager
def trajectory(model: nn.Module, reset: Optional[ResetPolicy] = None,
               share_inputs: bool = True) -> Iterator[list[LayerState]]:
    """Give every modulated/cached layer of `model` fresh state for one sampling trajectory.

    Every call of `model` inside the block is one sampling step (call `model`, not a submodule of it).
    reset: ``per_trajectory`` (default from the config): state persists across the model calls of the
    block. ``per_step``: the state is cleared before every model call, so every call is a warm-up call on
    full-precision activations; this is the published CIFAR-10 loop, offered only to measure its effect.
    share_inputs: layers that read one tensor with interchangeable quantizers (`shared_input_pairs`: an
    attention block's q, k, v under a dynamic quantizer) keep one a_hat, updated once per step. Their states
    would be identical, so the outputs are the same bit for bit either way; False keeps one state per layer.
    On a model without modulated or cached layers (full precision, direct quantization) the block does
    nothing and yields no states, so callers need not ask whether a model is stateful.
    """
    if reset is not None:
        _check(reset, ResetPolicy, "reset")
    layers = stateful_layers(model)
    if not layers:
        yield []
        return
    policy = reset or layers[0].config.reset
    _check(policy, ResetPolicy, "reset")
    if any(layer.state.phase != "inactive" for layer in layers):
        raise RuntimeError("trajectory() is already active for this model; nesting is not allowed")
    if any(layer.act is not None and layer.act.config.dynamic and layer.act.spec.granularity == "sample"
           for layer in layers):
        register_op()  # eagerly, before a compiled graph reads it (`modulate` takes it on CUDA)
    hook = TrajectoryHook(layers, policy)
    hook.reset_state()
    try:
        for follower, leader in shared_input_pairs(model) if share_inputs else ():
            follower.state.shared_with = leader.state
        with attach(HOOK_NAME, [(model, hook)]):
            yield [layer.state for layer in layers]
    finally:
        for layer in layers:
            layer.state.clear()
            layer.state.phase = "inactive"
            layer.state.shared_with = None


def state_bytes(states: list[LayerState]) -> int:
    """Bytes of state the layers hold over all layers (for the whole batch; a_ref counted when distinct, o_hat
    where the real backend keeps it)."""
    tensors = {id(t): t for s in states for t in (s.a_hat, s.a_ref, s.o_hat) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())
