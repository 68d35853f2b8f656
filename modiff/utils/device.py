"""Device selection ("auto" takes CUDA where it is available) and the host's threads beside it."""
from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "host_threads"]


ALLOWED = "auto, cpu, cuda or cuda:N (N the GPU's index)"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA where available), ``cpu``, ``cuda`` or ``cuda:N``; a ValueError saying what is
    allowed for anything else, for CUDA where there is none, and for a GPU index that does not exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use {ALLOWED}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use {ALLOWED}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPUs "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def host_threads() -> int:
    """Threads for host work that runs beside the device (PNG writing; per-seed noise draws, which cap it at
    2): one per CPU this process may use, at most 4 (benchmarks/README.md, "A batch encoded at once": two threads were the best on a
    2-core machine, four on a 16-core one with an older PNG writer)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, usable))
