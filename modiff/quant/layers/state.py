"""The cross-step state of one modulated/cached layer and the phase of its coming call.

A layer keeps a_hat (input-shaped; its output is o_hat = A_q(a_hat) + b; the real backend keeps o_hat too,
`modiff.quant.layers.real`) and, without error compensation,
a_ref (the previous exact input, the reference of the next residual), and counts model calls (one call =
one sampling step). `trajectory()` advances the phase before every model call; the layer only reads it.
Layers that read one tensor with interchangeable quantizers (an attention block's q, k, v) can share a_hat
and a_ref: `shared_with` points the later ones at the first one's state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from modiff.quant.config import QuantConfig

__all__ = ["LayerState", "Phase"]

# inactive: outside trajectory(); spent: the layer already ran for the current model call.
Phase = Literal["inactive", "warmup", "refresh", "skip", "spent"]


@dataclass
class LayerState:
    a_hat: Optional[torch.Tensor] = None  # (B, C_in, ...) input estimate: the layer outputs A_q(a_hat) + b
    a_ref: Optional[torch.Tensor] = None  # (B, C_in, ...) next residual's reference: a_hat with EC, else a_{t+1}
    o_hat: Optional[torch.Tensor] = None  # (B, C_out, ...) output estimate, kept by the real backend only
    calls: int = 0
    phase: Phase = "inactive"
    # the state of a layer that reads the same input before this one and advances a_hat (and a_ref) exactly as
    # this layer would: this layer then reads them instead of computing the same update (set by trajectory())
    shared_with: Optional["LayerState"] = None

    def clear(self) -> None:
        self.a_hat = self.a_ref = self.o_hat = None
        self.calls = 0

    def advance(self, config: QuantConfig) -> None:
        """Set the phase of the coming call from the call count and the layer's config."""
        step = self.calls
        self.calls += 1
        if step < config.warmup_steps:
            self.phase = "warmup"
        elif config.mode == "cache" and step % config.cache_interval != 0:
            self.phase = "skip"
        else:
            self.phase = "refresh"
