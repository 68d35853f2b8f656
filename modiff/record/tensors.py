"""Full activation tensors: which to keep (`TensorSpec`) and how they reach disk (`ShardWriter`).

Captured tensors are copied off the device at once (on CUDA: `non_blocking` into pinned host memory,
synchronised only when a shard is written) and buffered in host memory. As soon as the buffer holds more
than the memory budget, it is written as one safetensors shard `tensors-00001.safetensors`, ... and freed:
a shard is about the budget in size (at least one tensor). The device memory of the statistics is not
part of this budget.

Keys: `<site>/<capture>/step=<step:03d>/call=<call>` for the first trajectory, with `/part=<k>` appended for
the k-th later trajectory (`Recorder.next_trajectory`); a loader concatenates the parts along dim 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from modiff.record.sites import SiteSpec
from modiff.utils.runs import atomic_path

__all__ = ["TensorSpec", "ShardWriter", "tensor_key", "SHARD_PATTERN", "INDEX_FILE"]

log = logging.getLogger(__name__)

SHARD_PATTERN = "tensors-{:05d}.safetensors"
INDEX_FILE = "tensors.index.json"
Samples = Union[None, slice, Sequence[int]]


def tensor_key(site: str, capture: str, step: int, call: int) -> str:
    return f"{site}/{capture}/step={step:03d}/call={call}"


@dataclass(frozen=True)
class TensorSpec:
    """Which full tensors to keep: sites (the grammar of `select_sites`), step indices (None: every step)
    and samples (rows of dim 0; None: all; a slice or a list of indices). Sample indices count on over
    trajectories: with two batches of 8, sample 9 is row 1 of the second batch.
    """

    sites: SiteSpec = "conv,linear"
    steps: Optional[Sequence[int]] = None
    samples: Samples = None

    def __post_init__(self) -> None:
        if self.steps is not None:
            steps = tuple(int(s) for s in self.steps)
            if any(s < 0 for s in steps):
                raise ValueError(f"TensorSpec.steps are step indices (0, 1, ...), got {steps}")
            object.__setattr__(self, "steps", steps)
        samples = self.samples
        if isinstance(samples, slice):
            parts = (samples.start or 0, samples.stop if samples.stop is not None else 0, samples.step or 1)
            if any(p < 0 for p in parts) or parts[2] == 0:
                raise ValueError(f"TensorSpec.samples slice must be non-negative with step > 0, got {samples}")
        elif samples is not None:
            rows = tuple(int(i) for i in samples)
            if any(i < 0 for i in rows):
                raise ValueError(f"TensorSpec.samples must be non-negative indices, got {rows}")
            object.__setattr__(self, "samples", rows)

    def wants_step(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def rows(self, offset: int, n: int) -> list[int]:
        """Local rows (0..n-1) of a tensor whose first row is sample `offset`."""
        if self.samples is None:
            return list(range(n))
        if isinstance(self.samples, slice):
            wanted: Sequence[int] = range(*self.samples.indices(offset + n))
        else:
            wanted = self.samples
        return [g - offset for g in wanted if offset <= g < offset + n]

    def to_dict(self) -> dict[str, Any]:
        samples = self.samples
        if isinstance(samples, slice):
            samples = {"start": samples.start, "stop": samples.stop, "step": samples.step}
        return {"sites": self.sites if isinstance(self.sites, str) else list(self.sites),
                "steps": None if self.steps is None else list(self.steps), "samples": samples}


def _select_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if x.ndim == 0 or rows == list(range(x.shape[0])):
        return x
    if rows == list(range(rows[0], rows[-1] + 1)):
        return x[rows[0] : rows[-1] + 1]
    index = torch.tensor(rows, dtype=torch.long)
    if x.is_cuda:
        index = index.pin_memory().to(x.device, non_blocking=True)
    return x.index_select(0, index)


class ShardWriter:
    """Buffers host copies of tensors and writes them as safetensors shards past `budget_bytes`."""

    def __init__(self, out_dir: Path, budget_bytes: int):
        self.out_dir = Path(out_dir)
        self.budget_bytes = int(budget_bytes)
        self.shards: list[str] = []
        self.parts: dict[str, list[dict[str, Any]]] = {}  # base key -> [{key, file, rows}]
        self.total_bytes = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._entries: list[tuple[str, dict[str, Any]]] = []
        self._events: list[Any] = []
        self._bytes = 0

    def add(self, base: str, part: int, x: torch.Tensor, rows: list[int], global_rows: list[int]) -> None:
        """Copy rows `rows` of `x` (a device tensor) into the buffer under `base` (+ `/part=<part>`)."""
        key = base if part == 0 else f"{base}/part={part}"
        if key in self._buffer or any(e["key"] == key for e in self.parts.get(base, [])):
            raise RuntimeError(f"tensor {key} captured twice")  # an internal invariant of the recorder
        picked = _select_rows(x.detach(), rows)
        if picked.is_cuda:
            host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
            host.copy_(picked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._events.append(event)
        else:
            host = picked.clone(memory_format=torch.contiguous_format)
        self._buffer[key] = host
        self._entries.append((base, {"key": key, "rows": list(global_rows)}))
        self._bytes += host.numel() * host.element_size()
        if self._bytes > self.budget_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffer as the next shard (waiting for pending device copies) and empty it."""
        if not self._buffer:
            return
        for event in self._events:
            event.synchronize()
        name = SHARD_PATTERN.format(len(self.shards) + 1)
        with atomic_path(self.out_dir / name) as tmp:
            save_file(self._buffer, str(tmp))
        for base, entry in self._entries:
            self.parts.setdefault(base, []).append({**entry, "file": name})
        log.info("wrote %s: %d tensors, %.1f MB", name, len(self._buffer), self._bytes / 2**20)
        self.shards.append(name)
        self.total_bytes += self._bytes
        self._buffer, self._entries, self._events, self._bytes = {}, [], [], 0

    def index(self) -> dict[str, Any]:
        """The content of tensors.index.json (after `flush`)."""
        weight_map = {e["key"]: e["file"] for entries in self.parts.values() for e in entries}
        return {"metadata": {"total_size": self.total_bytes, "shards": list(self.shards)},
                "weight_map": weight_map, "tensors": self.parts}
