"""The device work of one observation, shared by all reducers: few kernels, no host synchronisation.

The recorder observes a site once per (step, call) and reduces two tensors of the same shape: the
activation a_s ("raw") and the difference a_s - a_{s-1} ("diff"). They sit in one contiguous float32
buffer x of shape (K, B, ...) (K = 2, or 1 at the first step), and every reducer works on all K rows at
once. The passes over x are shared through `Observation`'s cached properties:

    minmax, channel_minmax  one aminmax over (K, B, C, R) -> per-channel min/max (K, C) -> min, max, absmax
    sample_moments          per-sample variance and mean (K, B) -> mean, M2 (Chan), sum x^2, norms, sigma
    count(blocks)           one counting pass for the blocks of every counting reducer

Counting. A counting reducer asks for a block per row: a `Grid` (Histogram, Quantiles) gets ge_j =
#{x >= edge_j} for edge_j = (j + lo / w) w, j < bins (w = (hi - lo) / bins), and #{x > hi}; `Beyond`
(Outliers) gets #{|x| > limit}. NaN counts as above every boundary (a histogram's overflow, an outlier).
Two backends, chosen by device:

    search  (CUDA) the boundaries of all blocks merged and sorted per row, one searchsorted over x, one
            shared-memory histogram (torch.histc on the int32 positions) per row, a cumulative sum:
            3 passes over x whatever the number of reducers
    grid    (CPU) the bin of x is floor(x / w - lo / w) (vectorised arithmetic, about 8 cheap passes, far
            faster on a CPU than a binary search), limits by direct comparison

They agree exactly except for a value within a rounding error (relative 1e-7) of a bin edge, which the
grid backend may put in the neighbouring bin; for symmetric ranges and an even number of bins both treat
the edge at 0 exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Literal, NamedTuple, Optional, Protocol, Sequence, Union, get_args

import numpy as np
import torch

__all__ = ["Observation", "Grid", "Beyond", "CountBackend", "Slot", "Columns", "ResultBatch", "update_rows", "results_of", "result_batches",
           "ReducerLike"]

CountBackend = Literal["auto", "search", "grid"]


class ReducerLike(Protocol):
    """What this module uses of a reducer (`modiff.record.reducers.Reducer` and its subclasses)."""

    name: str

    def state(self) -> Optional[dict[str, Union[torch.Tensor, "Slot"]]]: ...

    def result(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Grid:
    """Boundaries lo + j (hi - lo) / bins for j < bins, then hi+ (bins + 1 per row); lo, hi: (K,) float32."""

    lo: torch.Tensor
    hi: torch.Tensor
    bins: int

    @property
    def size(self) -> int:
        return self.bins + 1

    def units(self) -> tuple[torch.Tensor, torch.Tensor]:
        """step = (hi - lo) / bins and offset = lo / step (K,): edge j is (j + offset) * step. For the usual
        symmetric ranges and even bins the offset is an exact integer, so the edges near 0 are exact."""
        step = (self.hi - self.lo) / self.bins
        return step, self.lo / step

    def boundaries(self) -> torch.Tensor:
        """(K, bins + 1) float32."""
        step, offset = self.units()
        j = torch.arange(self.bins, device=self.lo.device, dtype=torch.float32)
        edges = (j + offset[:, None]) * step[:, None]
        return torch.cat([edges, torch.nextafter(self.hi, torch.full_like(self.hi, math.inf))[:, None]], dim=1)


@dataclass(frozen=True)
class Beyond:
    """Magnitude limits, (K, L) float32 and positive: counted as #{|x| > lim} (NaN counts)."""

    limits: torch.Tensor

    @property
    def size(self) -> int:
        return self.limits.shape[1]

    def boundaries(self) -> torch.Tensor:
        """|x| > lim  <=>  x < -lim  or  x >= the next float above lim: (K, 2 L)."""
        lim = self.limits
        return torch.cat([lim.neg(), torch.nextafter(lim, torch.full_like(lim, math.inf))], dim=1)


Block = Union[Grid, Beyond]


class Observation:
    """K stacked tensors of one shape (K, B, ...), float32 and contiguous, with shared reductions."""

    def __init__(self, x: torch.Tensor, backend: CountBackend = "auto"):
        if backend not in get_args(CountBackend):
            raise ValueError(f"backend must be one of {get_args(CountBackend)}, got {backend!r}")
        self.x = x.float().contiguous()
        self.k = x.shape[0]
        self.numel = x[0].numel()  # values per row: a host int, known without a sync
        self.samples = x.shape[1] if x.ndim > 1 else 1
        self.backend = ("search" if x.is_cuda else "grid") if backend == "auto" else backend

    @classmethod
    def of(cls, x: torch.Tensor, backend: CountBackend = "auto") -> "Observation":
        """One tensor as an observation of K = 1 row."""
        return cls(x.detach().unsqueeze(0), backend)

    @cached_property
    def rows(self) -> torch.Tensor:
        return self.x.view(self.k, -1)

    @cached_property
    def channel_minmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (dim 1 of one tensor) min and max, (K, C) each."""
        if self.x.ndim < 3:
            raise ValueError(f"per-channel statistics need tensors with a channel dim 1, got shape {tuple(self.x.shape[1:])}")
        mins, maxs = _aminmax(self.x.view(self.k, self.samples, self.x.shape[2], -1), dim=-1)
        return mins.amin(dim=1), maxs.amax(dim=1)

    @cached_property
    def minmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        """min and max of each row, (K,) each."""
        if self.x.ndim >= 3:
            mins, maxs = self.channel_minmax
            return mins.amin(dim=1), maxs.amax(dim=1)
        return _aminmax(self.rows, dim=1)

    @cached_property
    def absmax(self) -> torch.Tensor:
        lo, hi = self.minmax
        return torch.maximum(hi, lo.neg())

    @cached_property
    def sample_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population variance and mean of each sample, (K, B) each, stable for large means: one Welford
        pass on CUDA; two passes on the CPU, where they are faster than torch's Welford kernel."""
        per_sample = self.x.view(self.k, self.samples, -1)
        if per_sample.is_cuda:
            return torch.var_mean(per_sample, dim=-1, correction=0)
        mean = per_sample.mean(dim=-1)
        var = torch.linalg.vector_norm(per_sample - mean[..., None], dim=-1).square_() / per_sample.shape[-1]
        return var, mean

    @cached_property
    def moments(self) -> torch.Tensor:
        """(K, 4) float64: mean, M2 = sum (x - mean)^2, sum x^2, sum over samples of ||x_b||."""
        var_b, mean_b = (t.double() for t in self.sample_moments)
        d = self.numel // self.samples  # values per sample
        mean = mean_b.mean(dim=1)
        m2 = d * (var_b.sum(dim=1) + (mean_b - mean[:, None]).square().sum(dim=1))  # Chan: within + between
        sumsq_b = d * torch.addcmul(var_b, mean_b, mean_b)
        return torch.stack([mean, m2, sumsq_b.sum(dim=1), sumsq_b.sqrt().sum(dim=1)], dim=1)

    @cached_property
    def sigma(self) -> torch.Tensor:
        """Population standard deviation of each row, (K,) float32."""
        return (self.moments[:, 1] / self.numel).sqrt().float()

    @cached_property
    def magnitude(self) -> torch.Tensor:
        return self.rows.abs()

    def count(self, blocks: Sequence[Block]) -> list[torch.Tensor]:
        """Per block (K, block.size) int64: ge = #{x >= b} for a Grid, #{|x| > lim} for Beyond."""
        if self.backend == "search":
            return _count_search(self.rows, blocks, self.numel)
        return [_count_grid(self.rows, b) if isinstance(b, Grid) else _count_beyond(self, b) for b in blocks]


def _count_search(rows: torch.Tensor, blocks: Sequence[Block], n: int) -> list[torch.Tensor]:
    parts = [b.boundaries() for b in blocks]
    bounds = torch.cat(parts, dim=1).nan_to_num_(nan=-math.inf)  # (K, M); a NaN would break the sort order
    k, m = bounds.shape
    ordered, order = torch.sort(bounds, dim=1)
    pos = torch.searchsorted(ordered, rows, right=True, out_int32=True)  # #{b <= x}, NaN -> M
    if rows.is_cuda:  # shared-memory histograms; integer input: exact int32 counts, no sync
        counts = torch.stack([torch.histc(pos[i], bins=m + 1, min=0, max=m + 1) for i in range(k)])
    else:
        index = (pos.long() + torch.arange(k, device=rows.device)[:, None] * (m + 1)).view(-1)
        counts = torch.zeros(k * (m + 1), dtype=torch.int64, device=rows.device)
        one = torch.ones(1, dtype=torch.int64, device=rows.device).expand_as(index)
        counts = counts.scatter_add_(0, index, one).view(k, m + 1)
    ge_sorted = n - counts.cumsum(dim=1, dtype=torch.int64)[:, :m]  # #{pos > p} = #{x >= ordered[p]}
    ge = torch.empty_like(ge_sorted).scatter_(1, order, ge_sorted)
    out = []
    for block, part in zip(blocks, torch.split(ge, [p.shape[1] for p in parts], dim=1)):
        if isinstance(block, Beyond):
            lows, highs = part.chunk(2, dim=1)
            part = (n - lows) + highs
        out.append(part)
    return out


def _count_grid(rows: torch.Tensor, grid: Grid) -> torch.Tensor:
    k, bins = rows.shape[0], grid.bins
    step, offset = grid.units()
    whole = offset.floor()  # floor(x / step - offset) as floor(x / step - frac) - whole: exact near 0 when frac = 0
    index = torch.div(rows, step[:, None]).sub_((offset - whole)[:, None]).floor_().sub_(whole[:, None])
    index.clamp_(-1, bins - 1)
    index.masked_fill_(rows > grid.hi[:, None], bins).nan_to_num_(nan=bins)  # above hi, or NaN: overflow
    index += torch.arange(1, k * (bins + 2), bins + 2, device=rows.device, dtype=index.dtype)[:, None]
    index = index.long().view(-1)
    counts = torch.zeros(k * (bins + 2), dtype=torch.int64, device=rows.device)
    one = torch.ones(1, dtype=torch.int64, device=rows.device).expand_as(index)
    counts = counts.scatter_add_(0, index, one).view(k, bins + 2)  # [under, bins..., over]
    return counts.flip(1).cumsum(dim=1).flip(1)[:, 1:]


def _count_beyond(obs: Observation, block: Beyond) -> torch.Tensor:
    within = [torch.count_nonzero(obs.magnitude <= lim[:, None], dim=1) for lim in block.limits.T]
    return obs.numel - torch.stack(within, dim=1)  # NaN is not within any limit


def _aminmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass on CUDA; on the CPU amin and amax apart are faster than aminmax."""
    if x.is_cuda:
        return torch.aminmax(x, dim=dim)
    return x.amin(dim=dim), x.amax(dim=dim)


def update_rows(rows: Sequence[Sequence[ReducerLike]], obs: Observation) -> None:
    """Update reducer `rows[k][j]` with row k of `obs`; column j holds copies of one reducer (one per row).

    Each column is updated by its class's `update_group`; the counting blocks it returns are counted in
    one pass for all columns and handed back through `take_counts`.
    """
    if obs.numel == 0:
        return
    pending = []
    for column in zip(*rows):
        block = type(column[0]).update_group(list(column), obs)
        if block is not None:
            pending.append((column, block))
    if pending:
        for (column, _), ge in zip(pending, obs.count([b for _, b in pending])):
            type(column[0]).take_counts(list(column), ge, obs)


@dataclass(frozen=True)
class Slot:
    """A state tensor kept as a region of a larger device tensor (the fused path's arenas): `results_of`
    gathers the regions of many reducers at once on the source's device; `convert` gives the state's form
    (it works on stacked states: (K, *shape) -> (K, ...))."""

    source: torch.Tensor
    start: int
    shape: tuple[int, ...]
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class Columns(NamedTuple):
    """Results of K reducers of one class: scalars (K,) float64 and arrays (K, ...)."""

    scalars: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, results: Sequence[dict[str, Any]]) -> "Columns":
        """Columns of result dicts that share their names (scalars: anything `float` takes)."""
        first = results[0] if results else {}
        for result in results:
            if result.keys() != first.keys():
                raise ValueError(f"results of one reducer class with states of one shape must share their names, "
                                 f"got {sorted(first)} and {sorted(result)}: implement finish_columns for such a reducer")
        arrays = [n for n, v in first.items() if isinstance(v, np.ndarray)]
        return cls({n: np.array([float(r[n]) for r in results]) for n in first if n not in arrays},
                   {n: np.stack([r[n] for r in results]) for n in arrays})


class ResultBatch(NamedTuple):
    """The results of reducers `index` (positions in the list given to `result_batches`)."""

    index: list[int]
    columns: Columns

    def rows(self) -> list[dict[str, Any]]:
        """One result dict per reducer (floats and arrays), in the order of `index`."""
        scalars = {name: values.tolist() for name, values in self.columns.scalars.items()}
        arrays = self.columns.arrays
        return [{**{name: values[k] for name, values in scalars.items()}, **{name: values[k] for name, values in arrays.items()}}
                for k in range(len(self.index))]


_FINISH_BATCH = 4096  # reducers finished together at most: their stacked states stay some tens of MB


def results_of(reducers: Sequence[ReducerLike]) -> list[dict[str, Any]]:
    """`r.result()` for every reducer, with few device-to-host copies (`result_batches`)."""
    out: list[dict[str, Any]] = [{} for _ in reducers]
    for batch in result_batches(reducers):
        for i, result in zip(batch.index, batch.rows()):
            out[i] = result
    return out


def result_batches(reducers: Sequence[ReducerLike]) -> list[ResultBatch]:
    """The results of every reducer as column batches: `finish_columns` per batch of one class and name
    whose states have the same shapes, stacked where they live (Slot regions gathered from their arena on
    its device); reducers without state: `result()`."""
    batches: list[ResultBatch] = []
    same: dict[tuple[Any, ...], tuple[list[int], list[list[Any]]]] = {}  # layout -> (reducers, states by name)
    for i, reducer in enumerate(reducers):
        state = reducer.state()
        if state is None:
            batches.append(ResultBatch([i], Columns.of([reducer.result()])))
            continue
        layout: list[Any] = [type(reducer), reducer.name]
        for name, t in state.items():
            layout.append((name, type(t), t.shape, t.convert if isinstance(t, Slot) else None))
        index, columns = same.setdefault(tuple(layout), ([], [[] for _ in state]))
        index.append(i)
        for column, t in zip(columns, state.values()):
            column.append(t)
    for (cls, _, *names), (index, columns) in same.items():
        for at in range(0, len(index), _FINISH_BATCH):
            part = slice(at, at + _FINISH_BATCH)
            stacked = {name: _stack(column[part]) for (name, *_), column in zip(names, columns)}
            batches.append(ResultBatch(index[part], cls.finish_columns([reducers[i] for i in index[part]], stacked)))
    return batches


def _stack(states: Sequence[torch.Tensor | Slot]) -> torch.Tensor:
    """(K, ...) of state tensors, or of Slot regions of one shape (gathered per source at once, then
    converted), on their device."""
    first = states[0]
    if not isinstance(first, Slot):
        return torch.stack(states)  # type: ignore[arg-type]
    size = math.prod(first.shape)
    by_source: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}
    for k, slot in enumerate(states):
        _, ks, starts = by_source.setdefault(id(slot.source), (slot.source, [], []))  # type: ignore[union-attr]
        ks.append(k)
        starts.append(slot.start)  # type: ignore[union-attr]
    out = first.source.new_empty((len(states), size))
    for source, ks, starts in by_source.values():
        windows = source.reshape(-1).unfold(0, size, 1)  # (n - size + 1, size): a view
        out[torch.tensor(ks, device=out.device)] = windows[torch.tensor(starts, device=out.device)]
    out = out.reshape(len(states), *first.shape)
    return out if first.convert is None else first.convert(out)


def fixed_range(lo: float, hi: float, device: Optional[torch.device]) -> torch.Tensor:
    """(2,) float32 [lo, hi] on `device`, filled by kernels (no host-to-device copy, no sync)."""
    out = torch.full((2,), lo, dtype=torch.float32, device=device)
    out[1] = hi
    return out
