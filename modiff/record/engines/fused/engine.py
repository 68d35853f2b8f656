"""The fused recording path: the built-in reducers in Triton kernels, one launch per site call.

The reference path (`batched.update_rows`) dispatches about 400 small operators per site call for the
default reducers; a GPU pays each as a kernel launch. Here the recorder's buffer update and every built-in
reducer of the raw and the diff key run as the kernels of `modiff.record.engines.fused.triton_kernels` (scan, summary, count,
add_counts; on CUDA the count is CUDA C with shared-memory histograms, `modiff.record.engines.fused.cuda_count`), and
the reducers' state lives in preallocated float64 arenas that the kernels update in place: a key takes
its slot once, and `batched.result_batches` gathers the slots of many keys at once (`batched.Slot`). A site call launches its scan; the summaries and counts of all site calls of a model
call run together at the next flush (`FusedEngine.flush`), four launches for the whole model call.

The results equal the reference's (`search` count backend): counts, min, max and channel absmax exactly,
moments up to float rounding (float32 Chan-merged chunks instead of Welford passes). Per key the state
layout is: Stats (6) | ChannelAbsMax (C) | per-key grid ranges (2 each) | the count slots (summed from the
count programs' scratch): per grid positions (bins + 2) | outlier hits. Histogram ranges per site (or fixed)
live in a (2, grids, 2) tensor per site.

Supported: `Stats`, `ChannelAbsMax(dim=1)`, `Histogram`, `Quantiles`, `Outliers` (exactly these types),
on tensors with at least 2 dims (samples, channels, ...); a site whose channel count changes raises when
ChannelAbsMax is recorded. With other reducers `engine="fused"` raises and `engine="auto"` (the default)
takes the reference path, which records any reducer; "auto" also takes it off CUDA or without Triton.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ContextManager, Literal, Optional, Sequence, get_args

import numpy as np
import torch

from modiff.record.engines.fused.layout import COUNTS, DATA, DESCRIPTOR, FIRST, N_OLD, NEW_SITE, PARTIAL_AT, STATE
from modiff.record.engines.reference import ReferenceEngine
from modiff.record.results import Slot
from modiff.record.reducers import ChannelAbsMax, Histogram, Outliers, Quantiles, Reducer, Stats

__all__ = ["FusedEngine", "fused_supported", "use_fused"]

EngineName = Literal["auto", "reference", "fused"]  # as modiff.record.engines.EngineName
CountBackend = Literal["shared", "triton"]
# How engines made from now on count: "shared", the CUDA C kernel of `count_cuda` (shared-memory atomics)
# where it compiles and the grids fit, else Triton; "triton", always `kernels.count_kernel` (benchmarks
# compare the two: bench_record.py --engines fused,fused/triton-count).
COUNT_BACKEND: CountBackend = "shared"
_TYPES = (Stats, ChannelAbsMax, Histogram, Quantiles, Outliers)
_ALIGN = 16  # slot offsets stay multiples of 16 elements
_TILE = 1024  # values per scan chunk; a program reduces one block of channels (bench_record_scan.py: 512-4096 timed)
_COUNT_BLOCK = 1024
_COUNT_BLOCKS_PER_PROGRAM = 8  # at least, so that small layers do not pay for a wide scratch reduction
_ADD_TILE = (64, 128)  # (programs, slots) per add_counts chunk
_COUNT_PROGRAMS = 32  # count programs per descriptor at most (a model call has many: they fill the GPU together)


def fused_supported(reducers: Sequence[Reducer]) -> bool:
    """Whether every reducer has a fused implementation (exact built-in types, per-channel absmax on dim 1)."""
    return all(type(r) in _TYPES for r in reducers) and all(
        r.dim == 1 for r in reducers if isinstance(r, ChannelAbsMax))


def use_fused(engine: EngineName, reducers: Sequence[Reducer], device: Optional[torch.device] = None) -> bool:
    """Whether the fused kernels record these reducers on `device`.

    "fused": always (on a CPU that needs the Triton interpreter; unsupported reducers raise). "auto": on
    CUDA when Triton imports and every reducer is supported (on an H200 faster than the torch path for
    `Stats` and for the default reducers, see benchmarks/README.md); else the torch path. "reference": never.
    """
    if engine not in get_args(EngineName):
        raise ValueError(f"engine must be one of {get_args(EngineName)}, got {engine!r}")
    if engine == "reference" or not reducers:  # without reducers only the buffer is updated: two torch ops
        return False
    if engine == "auto":
        return device is not None and device.type == "cuda" and fused_supported(reducers) and _triton_imports()
    if not fused_supported(reducers):
        raise ValueError(f"engine='fused' supports only {[t.__name__ for t in _TYPES]} (ChannelAbsMax(dim=1)); "
                         f"got {reducers!r}")
    return True


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels() -> ModuleType:
    from modiff.record.engines.fused import triton_kernels as kernels  # imported on first use: TRITON_INTERPRET is read when it is
    return kernels


def _count_cuda() -> ModuleType:
    from modiff.record.engines.fused import cuda_count

    return cuda_count


def _on(device: torch.device) -> ContextManager[Any]:
    """Triton and NVRTC kernels launch on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _positions_to_ge(counts: torch.Tensor) -> torch.Tensor:
    """Counts per position #{edges <= x} (..., bins + 2) -> ge_j = #{x >= edge_j} (..., bins + 1), as `Histogram` keeps."""
    counts = counts.to(torch.int64)
    return counts.sum(dim=-1, keepdim=True) - counts.cumsum(dim=-1)[..., :-1]  # ge_j = n - #{position <= j}


def _as_int(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.int64)


class Arena:
    """Zeroed float64 device chunks; a key takes its state slot once, so no call allocates."""

    def __init__(self, device: torch.device, chunk: int = 1 << 20):
        self.device, self.chunk = device, chunk
        self.chunks: list[torch.Tensor] = []
        self.used = 0

    def take(self, n: int) -> tuple[torch.Tensor, int]:
        n = _aligned(n)
        if not self.chunks or self.used + n > self.chunks[-1].numel():
            self.chunks.append(torch.zeros(max(self.chunk, n), dtype=torch.float64, device=self.device))
            self.used = 0
        start, self.used = self.used, self.used + n
        return self.chunks[-1], start


@dataclass
class _Grid:
    reducer: Histogram  # the template (Quantiles: its histogram)
    counts_at: int
    range_at: int  # in the key slot, per-key ranges only; else 0

    @property
    def mode(self) -> int:
        """0 fixed range, 1 per site, 2 per key (the kernels' codes)."""
        h = self.reducer
        return 0 if h.range is not None else (1 if h.per == "site" else 2)


@dataclass
class _Key:
    chunk: torch.Tensor
    start: int
    seen: int = 0  # values reduced so far


@dataclass
class _Scratch:
    chmin: torch.Tensor  # (2, samples, channels), NaN where the sample's channel has one
    chmax: torch.Tensor
    partials: torch.Tensor


def _upload(values: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host table on ``device`` without a host synchronisation: through pinned memory, asynchronously."""
    table = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


class SitePlan:
    """State layout, descriptors and scratch of one (site, capture) for the template reducers."""

    def __init__(self, reducers: Sequence[Reducer], channels: int, device: torch.device):
        self.channels, self.device = channels, device
        size = 0
        self.stats_at = self.chabs_at = -1
        if any(isinstance(r, Stats) for r in reducers):
            self.stats_at, size = size, size + 6
        if any(isinstance(r, ChannelAbsMax) for r in reducers):
            self.chabs_at, size = size, size + channels
        self.grids: dict[int, _Grid] = {}  # reducer index -> grid
        self.outliers: dict[int, int] = {}  # reducer index -> first hit slot
        limits: list[tuple[float, float]] = []
        for j, r in enumerate(reducers):
            if isinstance(r, (Histogram, Quantiles)):
                grid = self.grids[j] = _Grid(r if isinstance(r, Histogram) else r._hist, 0, 0)
                if grid.mode == 2:
                    grid.range_at, size = size, size + 2
        self.counts_at = size  # the count slots, contiguous: add_counts adds them as one block
        for grid in self.grids.values():
            grid.counts_at, size = size, size + grid.reducer.bins + 2
        self.outliers_at = size  # the hits of all Outliers, one block for the count kernel
        for j, r in enumerate(reducers):
            if isinstance(r, Outliers):
                self.outliers[j] = size
                limits += [(k, 0.0) for k in r.ks] + ([(r.threshold, 1.0)] if r.threshold is not None else [])
                size += len(r.ks) + (r.threshold is not None)
        self.size = size
        self.count_slots = size - self.counts_at
        grids = list(self.grids.values())
        self.edges_at = list(np.cumsum([0] + [g.reducer.bins + 1 for g in grids]))
        self.grid_table = _upload([[g.reducer.bins, g.mode, self.edges_at[i], g.counts_at, g.range_at]
                                   for i, g in enumerate(grids)] or [[0] * 5], torch.int32, device)
        self.scales = _upload([g.reducer.scale for g in grids] or [0.0], torch.float32, device)
        self.limits = _upload(limits or [(0.0, 0.0)], torch.float32, device)
        self.n_limits = len(limits)
        ranges = torch.zeros((2, max(len(grids), 1), 2), dtype=torch.float64)
        for i, g in enumerate(grids):
            if g.reducer.range is not None:  # rounded to float32 as `fixed_range` does
                ranges[:, i] = torch.tensor(g.reducer.range, dtype=torch.float32).double()
        self.site_ranges = _upload(ranges, torch.float64, device)
        self.site_range_set = [False, False]
        self.edges = torch.empty((2, max(self.edges_at[-1], 1)), dtype=torch.float32, device=device)
        self.approx = torch.empty((2, max(len(grids), 1), 2), dtype=torch.float32, device=device)
        self.bounds = torch.empty((2, max(self.n_limits, 1), 2), dtype=torch.float32, device=device)
        self._scratch: Optional[_Scratch] = None
        self._scratch_shape: tuple[int, int] = (0, 0)
        self.layouts = self._layouts(reducers)
        self._launches: dict[torch.Size, _Launch] = {}

    def scratch(self, samples: int, tiles: int) -> _Scratch:
        """Per (sample, channel) extremes and per-tile moments, all written by the scan before being read."""
        if self._scratch_shape != (samples, tiles):
            c, dev = self.channels, self.device
            self._scratch = _Scratch(torch.empty((2, samples, c), device=dev), torch.empty((2, samples, c), device=dev),
                                     torch.empty((2, samples, tiles, 2), dtype=torch.float32, device=dev))
            self._scratch_shape = (samples, tiles)
        return self._scratch

    def _layouts(self, reducers: Sequence[Reducer]) -> list[list[tuple[str, int, tuple[int, ...], Any, bool]]]:
        """Per reducer index: its state entries (name, offset in the key slot or the site ranges, shape,
        host conversion, whether the entry lives in the site ranges)."""
        names = list(self.grids)
        out = []
        for j, reducer in enumerate(reducers):
            if isinstance(reducer, Stats):
                out.append([("state", self.stats_at, (6,), None, False)])
            elif isinstance(reducer, ChannelAbsMax):
                out.append([("absmax", self.chabs_at, (self.channels,), None, False)])
            elif isinstance(reducer, Outliers):
                out.append([("hits", self.outliers[j], (len(reducer.ks) + (reducer.threshold is not None),), _as_int, False)])
            else:
                grid = self.grids[j]
                ge = ("ge", grid.counts_at, (grid.reducer.bins + 2,), _positions_to_ge, False)
                lo_hi = (("lo_hi", grid.range_at, (2,), None, False) if grid.mode == 2
                         else ("lo_hi", names.index(j) * 2, (2,), None, True))
                out.append([ge, lo_hi])
        return out

    def bind(self, row: Sequence[Reducer], key: _Key, index: int) -> None:
        """Point the reducers of a key (row `index`: 0 raw, 1 diff) at their state (`Reducer.state` form)."""
        site_at = index * self.site_ranges.shape[1] * 2
        for reducer, layout in zip(row, self.layouts):
            reducer.place({name: (Slot(self.site_ranges, site_at + at, shape, convert) if per_site
                                  else Slot(key.chunk, key.start + at, shape, convert))
                           for name, at, shape, convert, per_site in layout})

    def descriptor(self, k: int, key: _Key, launch: "_Launch", buffer: torch.Tensor) -> list[int]:
        """The DESCRIPTOR fields of row k (0 raw, 1 diff) of a site call (partial_at is set at the flush)."""
        fields = launch.descriptors[k].copy()
        state = key.chunk.data_ptr() + key.start * 8
        fields[STATE], fields[FIRST], fields[N_OLD], fields[COUNTS] = state, int(key.seen == 0), key.seen, \
            state + self.counts_at * 8
        fields[NEW_SITE] = int(not self.site_range_set[k])
        fields[DATA] = buffer.data_ptr() + k * launch.numel * 4
        self.site_range_set[k] = True
        return fields

    def static_fields(self, k: int, launch: "_Launch") -> list[int]:
        """The fields of row k that stay the same for every call with this launch configuration (0 elsewhere)."""
        scratch, b, c = launch.scratch, launch.samples, launch.channels
        return [scratch.partials.data_ptr() + k * b * launch.tiles * 8, scratch.chmin.data_ptr() + k * b * c * 4,
                scratch.chmax.data_ptr() + k * b * c * 4, 0, 0, 0, launch.numel,
                self.site_ranges.data_ptr() + k * self.site_ranges.shape[1] * 16, 0, self.grid_table.data_ptr(),
                self.edges.data_ptr() + k * self.edges.shape[1] * 4, self.approx.data_ptr() + k * self.approx.shape[1] * 8,
                self.bounds.data_ptr() + k * self.bounds.shape[1] * 8, b, c, launch.inner, launch.tiles,
                launch.cb, 0, launch.count_programs, 0, 0]

    def launch(self, shape: torch.Size, programs: int) -> "_Launch":
        """The launch configuration of a call on a tensor of `shape` (cached: sites keep their shapes)."""
        config = self._launches.get(shape)
        if config is None:
            config = self._launches[shape] = _Launch.of(self, shape, programs)
        return config


@dataclass
class _Launch:
    """Sizes and scan tiles of the kernels for one (site, shape)."""

    samples: int
    channels: int
    inner: int
    numel: int
    cb: int
    rb: int
    tiles: int
    scratch: _Scratch
    count_programs: int
    descriptors: tuple[list[int], list[int]] = ([], [])  # the static fields of rows 0 and 1

    @classmethod
    def of(cls, plan: SitePlan, shape: torch.Size, programs: int) -> "_Launch":
        samples, channels = shape[0], shape[1]
        numel = math.prod(shape)
        inner = numel // (samples * channels)
        cb, rb = _scan_tiles(channels, inner)
        tiles = -(-channels // cb)
        launch = cls(samples, channels, inner, numel, cb, rb, tiles, plan.scratch(samples, tiles),
                     max(1, min(-(-numel // (_COUNT_BLOCK * _COUNT_BLOCKS_PER_PROGRAM)), programs)))
        launch.descriptors = (plan.static_fields(0, launch), plan.static_fields(1, launch))
        return launch


@dataclass
class FusedEngine:
    """The fused path of one recorder: per-site plans, the state arena and the work not yet summarised.

    A site call launches its scan at once; its summary and counts wait in `pending` (descriptors) until
    `flush()`, which runs them for all waiting calls in four launches. The recorder flushes before every
    model call (each buffer and scratch is written once per model call) and before reading results; a site
    called again before a flush flushes first.
    """

    reducers: Sequence[Reducer]
    device: torch.device
    arena: Arena = field(init=False)
    plans: dict[tuple[str, str], SitePlan] = field(default_factory=dict)
    keys: dict[int, tuple[Reducer, _Key]] = field(default_factory=dict)  # id(first reducer of a key) -> state
    pending: list[list[int]] = field(default_factory=list)  # descriptors (DESCRIPTOR fields)
    _pending_plans: dict[int, SitePlan] = field(default_factory=dict)
    _pending_tensors: list[torch.Tensor] = field(default_factory=list)  # what the descriptors point into

    def __post_init__(self) -> None:
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"engine='fused' runs Triton kernels, which need CUDA; on {self.device} only in the "
                             "Triton interpreter (set TRITON_INTERPRET=1 before recording). Use engine='reference'.")
        self.arena = Arena(self.device)
        self.reference = ReferenceEngine()
        self.programs = _COUNT_PROGRAMS
        self.count_backend = COUNT_BACKEND

    name = "fused"

    def accepts(self, x: torch.Tensor) -> bool:
        return x.ndim >= 2 and x.numel() > 0 and x.device == self.device

    def update(self, site: tuple[str, str], rows: Sequence[Sequence[Reducer]], buffer: torch.Tensor,
               x: torch.Tensor, diff: bool) -> None:
        """buffer[0] <- x (after buffer[1] <- x - buffer[0] if diff) now; rows[k] (k = 0 raw, 1 diff) at the flush.
        Tensors the kernels do not take (scalars, empty, on another device) go the reference way."""
        if not self.accepts(x):
            return self.reference.update(site, rows, buffer, x, diff)
        plan = self._plan(site, x)
        if id(plan) in self._pending_plans:  # its scratch is about to be overwritten
            self.flush()
        launch = plan.launch(x.shape, self.programs)
        keys = [self._key(plan, row, k) for k, row in enumerate(rows)]
        scratch = launch.scratch
        x = x if x.is_contiguous() else x.contiguous()
        with _on(self.device):
            _kernels().scan_kernel[(launch.samples, launch.tiles)](
                x, buffer, scratch.chmin, scratch.chmax, scratch.partials, launch.samples, launch.channels,
                launch.inner, launch.tiles, HAS_DIFF=diff, STORE_DIFF=diff and plan.count_slots > 0, CB=launch.cb,
                RB=launch.rb)
        for k, (key, row) in enumerate(zip(keys, rows)):
            self.pending.append(plan.descriptor(k, key, launch, buffer))
            key.seen += launch.numel
            for reducer in row:
                reducer.count_values(launch.numel, launch.samples)
        self._pending_plans[id(plan)] = plan
        self._pending_tensors += [scratch.partials, scratch.chmin, scratch.chmax, buffer]

    def _plan(self, site: tuple[str, str], x: torch.Tensor) -> SitePlan:
        plan = self.plans.get(site)
        if plan is None:
            plan = self.plans[site] = SitePlan(self.reducers, x.shape[1], self.device)
        elif plan.chabs_at >= 0 and plan.channels != x.shape[1]:
            raise ValueError(f"ChannelAbsMax: {x.shape[1]} channels now, {plan.channels} before (site {site[0]})")
        return plan

    def _key(self, plan: SitePlan, row: Sequence[Reducer], index: int) -> _Key:
        entry = self.keys.get(id(row[0]))
        if entry is not None:
            return entry[1]
        key = _Key(*self.arena.take(plan.size))
        self.keys[id(row[0])] = (row[0], key)
        plan.bind(row, key, index)
        return key

    def flush(self) -> None:
        """Summaries (and counts) of every pending site call: one launch per kernel for all of them."""
        if not self.pending:
            return
        plan = next(iter(self._pending_plans.values()))  # the reducers, hence the layout offsets, are shared
        table = np.asarray(self.pending, dtype=np.int64)
        programs = table[:, DESCRIPTOR.index("programs")]
        table[:, PARTIAL_AT] = np.cumsum(programs) - programs
        desc = _upload(table, torch.int64, self.device)
        k, n = _kernels(), len(table)
        tp = _pow2(int(table[:, DESCRIPTOR.index("tiles")].max()))
        cbs = min(_pow2(int(table[:, DESCRIPTOR.index("channels")].max())), 256)
        samples = _pow2(int(table[:, DESCRIPTOR.index("samples")].max()))
        with _on(self.device):
            k.summary_kernel[(n,)](desc, plan.scales, len(plan.grids), plan.limits, plan.n_limits,
                                   STATS_AT=plan.stats_at, CHABS_AT=plan.chabs_at, BB=max(1, min(64, 4096 // tp)),
                                   TP=tp, SB=min(samples, max(1, 4096 // cbs)), CBS=cbs, EB=256)
            if plan.count_slots:
                self._count(k, plan, desc, n, int(programs.max()), int(programs.sum()))
        self.pending.clear()
        self._pending_plans.clear()
        self._pending_tensors.clear()

    def discard(self) -> None:
        """Drop the pending summaries (a recording stopped by an error)."""
        self.pending.clear()
        self._pending_plans.clear()
        self._pending_tensors.clear()

    def _count(self, k: ModuleType, plan: SitePlan, desc: torch.Tensor, n: int, programs: int, rows: int) -> None:
        """Count launches (two grids each, outliers with the first) into a scratch row per program, then one
        add_counts per key."""
        slots = plan.count_slots
        partials = torch.empty((rows, slots), dtype=torch.int32, device=self.device)
        grids = list(plan.grids.values())
        for pair_index, pair in enumerate([grids[i:i + 2] for i in range(0, len(grids), 2)] or [[]]):
            limits = plan.n_limits if pair_index == 0 else 0
            if not pair and not limits:
                continue
            ids = [grids.index(g) for g in pair] + [0, 0]
            bins = [g.reducer.bins for g in pair] + [0, 0]
            counts = [g.counts_at - plan.counts_at for g in pair] + [0, 0]
            edges = (int(plan.edges_at[ids[0]]), int(plan.edges_at[ids[1]]))
            shared = self._shared_count_kernel(bins, limits)
            if shared is not None:
                _count_cuda().launch_count(shared, desc, partials, slots, programs, n, edges, (ids[0], ids[1]),
                                           (counts[0], counts[1]), plan.outliers_at - plan.counts_at,
                                           (bins[0], bins[1]), limits)
                continue
            k.count_kernel[(programs, n)](
                desc, partials, slots, edges[0], ids[0], counts[0], edges[1], ids[1], counts[1],
                plan.outliers_at - plan.counts_at, BINS_A=bins[0], BINS_B=bins[1], NB_A=_pow2(bins[0]),
                NB_B=_pow2(bins[1]), LIMITS=limits, LP=_pow2(max(limits, 1)), BLOCK=_COUNT_BLOCK)
        pb, sb = _ADD_TILE
        k.add_counts_kernel[(-(-slots // sb), n)](desc, partials, slots, PB=pb, SB=sb)

    def count_kernel(self) -> CountBackend:
        """Which kernel counts: "shared" (CUDA C; Triton still takes grids it cannot hold) or "triton"."""
        available = self.count_backend == "shared" and _count_cuda().count_kernel_for(self.device) is not None
        return "shared" if available else "triton"

    def _shared_count_kernel(self, bins: Sequence[int], limits: int) -> Optional[Any]:
        """The CUDA C count kernel (`count_cuda`) where it compiles and these grids fit; else None: Triton."""
        if self.count_backend == "triton":
            return None
        cuda = _count_cuda()
        if not cuda.fits((bins[0], bins[1]), limits):
            return None
        return cuda.count_kernel_for(self.device)


def _scan_tiles(channels: int, inner: int) -> tuple[int, int]:
    """Chunk [channels CB, values RB] of the scan; a program reduces CB channels of one sample."""
    rb = min(_pow2(inner), _TILE)
    return max(1, min(_pow2(channels), _TILE // rb)), rb
