"""How a recorder computes its reducers: engines behind one protocol.

The recorder and the reducers say *what* is measured; an `Engine` owns *how*: `reference` (torch, any
reducer, any device) and `fused` (Triton kernels and a CUDA C count pass for the built-in reducers;
`modiff.record.engines.fused`). `make_engine` picks one at the recorder's first observation.
"""
from __future__ import annotations

from typing import Literal, Optional, Protocol, Sequence

import torch

from modiff.record.engines.fused.engine import FusedEngine, use_fused
from modiff.record.engines.reference import ReferenceEngine
from modiff.record.reducers import Reducer

__all__ = ["Engine", "EngineName", "check_engine", "make_engine"]

EngineName = Literal["auto", "reference", "fused"]


class Engine(Protocol):
    """Updates the reducers of one site call and finishes deferred work on request."""

    name: str  # "reference" or "fused", written into the recording's manifest

    def update(self, site: tuple[str, str], rows: Sequence[Sequence[Reducer]], buffer: torch.Tensor,
               x: torch.Tensor, diff: bool) -> None:
        """buffer[0] <- x (after buffer[1] <- x - buffer[0] where `diff`); rows[k] (0 raw, 1 diff) take
        row k of the buffer, at once or at the next `flush`."""

    def flush(self) -> None:
        """Finish every deferred update (before each model call and before results are read)."""

    def discard(self) -> None:
        """Drop deferred updates (after an error)."""

    def count_kernel(self) -> Optional[str]:
        """The kernel that counted histograms and quantiles, for the manifest (None for torch)."""


def check_engine(name: EngineName, reducers: Sequence[Reducer]) -> None:
    """Raise for an unknown engine name, or for `fused` with reducers it does not implement."""
    use_fused(name, reducers)


def make_engine(name: EngineName, reducers: Sequence[Reducer], device: torch.device) -> Engine:
    """The engine `name` asks for on `device` ("auto": fused on CUDA where it records every reducer)."""
    if use_fused(name, reducers, device):
        return FusedEngine(reducers, device)
    return ReferenceEngine()
