"""The reference engine: the reducers' own torch code, on any device and for any reducer.

Per site call: buffer[1] <- x - buffer[0] (in float32) where the difference is recorded, buffer[0] <- x,
then every reducer of both rows through `update_rows` (the shared passes of `modiff.record.results`).
Nothing waits for a flush.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from modiff.record.reducers import Reducer
from modiff.record.results import Observation, update_rows

__all__ = ["ReferenceEngine"]


class ReferenceEngine:
    """`Engine` of the torch path (see `modiff.record.engines`)."""

    name = "reference"

    def update(self, site: tuple[str, str], rows: Sequence[Sequence[Reducer]], buffer: torch.Tensor,
               x: torch.Tensor, diff: bool) -> None:
        if diff:
            torch.sub(x, buffer[0], out=buffer[1])  # in float32, as (a_s).float() - a_{s-1}
        buffer[0].copy_(x)
        update_rows(rows, Observation(buffer[: len(rows)]))

    def flush(self) -> None:
        """Nothing waits: every update is complete when it returns."""

    def discard(self) -> None:
        """Nothing waits: nothing to drop."""

    def count_kernel(self) -> Optional[str]:
        return None
