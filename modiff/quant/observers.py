"""Observers: running statistics of calibration activations that become STATIC qparams.

Each observer sees batches through ``update(x)`` and turns what it saw into ``(scale, zero_point)``
with ``qparams(spec)``. One observation serves several specs (bit widths, schemes, rounding) as long
as their granularity and channel axis are the ones the observer reduces with (given at construction,
or taken from ``spec`` in `make_observer`). Updates never read a tensor value back to the host;
running tensors stay on the device of the observed data.

Notation:

============  ===================================================================================
``x``         one observed batch, (B, C, ...) for activations
``keepdim``   shape of one batch's per-group ranges: (1, 1, 1, 1) for ``tensor``, (1, C, 1, 1) for
              ``channel`` with channel_axis=1 (4-D input)
``G``         number of qparam groups: 1 (``tensor``) or C (``channel``)
``rows``      the batch viewed as (G, n), one row per group
``m``         number of batches seen so far
============  ===================================================================================

Static qparams are defined only for granularities whose groups do not depend on the batch:
``tensor`` and ``channel``. ``sample``, ``token`` and ``group`` give one scale per sample; an observer
built for one raises a ValueError on its first ``update`` (not at construction, so that quantizers that
run dynamically may still own an unused observer).

Memory: MinMax/EMA/Percentile keep two keepdim tensors. The MSE observer also keeps a subsample of
at most ``max_values`` values in all (default 2^20: 4 MiB in float32), ``max_values // G`` per group.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Optional, get_args

import torch
from torch import Tensor

from modiff.quant.primitives import Granularity, QuantSpec, lp_search_qparams, qparams_from_range, reduce_range

__all__ = [
    "EMAObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "ObserverKind",
    "PercentileObserver",
    "StaticGranularity",
    "make_observer",
]

ObserverKind = Literal["minmax", "ema", "percentile", "mse"]
StaticGranularity = Literal["tensor", "channel"]


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Observer:
    """Base: granularity checks and the running per-group range (x_min, x_max), keepdim tensors."""

    def __init__(self, granularity: Granularity = "tensor", channel_axis: int = 1) -> None:
        if granularity not in get_args(Granularity):
            raise ValueError(f"granularity must be one of {get_args(Granularity)}, got {granularity!r}")
        if not isinstance(channel_axis, int) or isinstance(channel_axis, bool):
            raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
        self.granularity, self.channel_axis = granularity, channel_axis
        self.batches = 0  # m
        self.x_min: Optional[Tensor] = None  # (*keepdim)
        self.x_max: Optional[Tensor] = None  # (*keepdim)
        self._gen: Optional[torch.Generator] = None  # seeded lazily on the data's device

    def update(self, x: Tensor) -> None:
        """Take one batch into account (no host sync)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything observed (and restart the random stream: reset == fresh)."""
        self.batches, self.x_min, self.x_max, self._gen = 0, None, None, None

    @property
    def spec(self) -> QuantSpec:
        """The reduction this observer applies to every batch (its bit width is irrelevant)."""
        self._check_static()
        return QuantSpec(bits=8, granularity=self.granularity, channel_axis=self.channel_axis)

    def _check_static(self) -> None:
        if self.granularity not in get_args(StaticGranularity):
            raise ValueError(
                f"static qparams need granularity in {get_args(StaticGranularity)}, got "
                f"{self.granularity!r}: per-sample/token/group scales depend on the batch; quantize "
                f"dynamically or calibrate with granularity 'tensor' or 'channel'"
            )

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's per-group (min, max), float32 (float64 for float64 input), (*keepdim)."""
        x_min, x_max = reduce_range(x.detach(), self.spec)
        if self.x_min is not None and x_min.shape != self.x_min.shape:
            raise ValueError(
                f"{type(self).__name__}: this batch has per-group ranges of shape {tuple(x_min.shape)}, "
                f"earlier ones {tuple(self.x_min.shape)}; observed batches must agree in ndim and channels"
            )
        return x_min.to(_stat_dtype(x)), x_max.to(_stat_dtype(x))

    def _check_spec(self, spec: QuantSpec) -> None:
        self._check_static()
        if self.x_min is None:
            raise ValueError(f"{type(self).__name__} has observed no data: call update(x) on calibration batches first")
        same_axis = spec.granularity != "channel" or spec.channel_axis == self.channel_axis
        if spec.granularity != self.granularity or not same_axis:
            raise ValueError(
                f"{type(self).__name__} reduced with granularity {self.granularity!r} (channel_axis "
                f"{self.channel_axis}), but qparams were asked for granularity {spec.granularity!r} "
                f"(channel_axis {spec.channel_axis}); build the observer from the same spec (make_observer(kind, spec=spec))"
            )

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) for ``spec`` from the observed range, (*keepdim) each."""
        self._check_spec(spec)
        assert self.x_min is not None and self.x_max is not None
        return qparams_from_range(self.x_min, self.x_max, spec)

    def _rows(self, x: Tensor) -> Tensor:
        """x as (G, n): one row per qparam group."""
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        axis = self.channel_axis % x.ndim
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._gen
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            self._gen = gen
        return gen


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches."""

    def update(self, x: Tensor) -> None:
        b_min, b_max = self._batch_range(x)
        if self.x_min is None or self.x_max is None:
            self.x_min, self.x_max = b_min, b_max
        else:
            self.x_min, self.x_max = torch.minimum(self.x_min, b_min), torch.maximum(self.x_max, b_max)
        self.batches += 1


class EMAObserver(Observer):
    """Exponential moving average of per-batch min/max: r_m = momentum r_{m-1} + (1 - momentum) batch_m.

    The first batch initialises r_1 = batch_1 (as torch.ao's MovingAverageMinMaxObserver, whose
    ``averaging_constant`` is 1 - momentum).
    """

    def __init__(self, granularity: Granularity = "tensor", channel_axis: int = 1, momentum: float = 0.9) -> None:
        super().__init__(granularity, channel_axis)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def update(self, x: Tensor) -> None:
        b_min, b_max = self._batch_range(x)
        if self.x_min is None or self.x_max is None:
            self.x_min, self.x_max = b_min, b_max
        else:
            keep = self.momentum
            self.x_min = keep * self.x_min + (1.0 - keep) * b_min
            self.x_max = keep * self.x_max + (1.0 - keep) * b_max
        self.batches += 1


class PercentileObserver(Observer):
    """Per-batch quantiles (100 - percentile, percentile) of each group's values, averaged over batches.

    Quantiles use linear interpolation (as ``numpy.percentile``), computed by sorting. A group with more than
    ``max_values // G`` values in a batch is subsampled (with replacement, seeded ``torch.Generator``).
    """

    def __init__(
        self,
        granularity: Granularity = "tensor",
        channel_axis: int = 1,
        percentile: float = 99.99,
        max_values: int = 2**20,
        seed: int = 0,
    ) -> None:
        super().__init__(granularity, channel_axis)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        self.percentile, self.max_values, self.seed = float(percentile), int(max_values), int(seed)
        self._sum_low: Optional[Tensor] = None  # (*keepdim)
        self._sum_high: Optional[Tensor] = None  # (*keepdim)

    def reset(self) -> None:
        super().reset()
        self._sum_low = self._sum_high = None

    def update(self, x: Tensor) -> None:
        b_min, _ = self._batch_range(x)  # checks granularity and shapes; gives the keepdim shape
        rows = self._rows(x.detach()).to(b_min.dtype)  # (G, n)
        per_group = max(1, self.max_values // rows.shape[0])
        if rows.shape[1] > per_group:
            gen = self._generator(rows.device, self.seed)
            cols = torch.randint(rows.shape[1], (per_group,), generator=gen, device=rows.device)
            rows = rows[:, cols]  # (G, per_group)
        low, high = _quantiles(rows, self.percentile / 100.0)  # (G,) each
        low, high = low.reshape(b_min.shape), high.reshape(b_min.shape)
        if self._sum_low is None or self._sum_high is None:
            self._sum_low, self._sum_high = low, high
        else:
            self._sum_low, self._sum_high = self._sum_low + low, self._sum_high + high
        self.batches += 1
        self.x_min, self.x_max = self._sum_low / self.batches, self._sum_high / self.batches


def _quantiles(rows: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Per-row quantiles at 1 - fraction and fraction, linear interpolation (numpy's default).

    Sort-based with positions computed on the host from the row length, so there is no host sync
    (torch.quantile with a tensor of levels checks their range with one).
    """
    ordered = rows.sort(dim=1).values  # (G, n)
    last = rows.shape[1] - 1
    out = []
    for level in (1.0 - fraction, fraction):
        position = level * last
        below = min(int(position), last)
        above = min(below + 1, last)
        weight = position - below
        out.append(torch.lerp(ordered[:, below], ordered[:, above], weight))  # (G,)
    return out[0], out[1]


class MSEObserver(Observer):
    """Running min/max plus a bounded subsample; qparams from the clipping range of least Lp error.

    The candidates are (1 - i/grid) [x_min, x_max], i = 0 .. 0.8 grid - 1 (Q-Diffusion's search, whose
    Lp loss uses p = 2.4), scored by sum |x - Q(x)|^p on the subsample, per group. The subsample keeps
    whole batches while they fit in ``max_values // G`` values per group; after that batch m replaces a
    random 1/m of it (so every batch keeps about the same weight).
    """

    def __init__(
        self,
        granularity: Granularity = "tensor",
        channel_axis: int = 1,
        p: float = 2.4,
        grid: int = 100,
        max_values: int = 2**20,
        seed: int = 0,
    ) -> None:
        super().__init__(granularity, channel_axis)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p!r}")
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an int >= 2, got {grid!r}")
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        self.p, self.grid, self.max_values, self.seed = float(p), grid, int(max_values), int(seed)
        self.sample: Optional[Tensor] = None  # (G, k), k <= max_values // G

    def reset(self) -> None:
        super().reset()
        self.sample = None

    def update(self, x: Tensor) -> None:
        b_min, b_max = self._batch_range(x)
        rows = self._rows(x.detach()).to(b_min.dtype)  # (G, n)
        self.batches += 1
        if self.x_min is None or self.x_max is None:
            self.x_min, self.x_max = b_min, b_max
        else:
            self.x_min, self.x_max = torch.minimum(self.x_min, b_min), torch.maximum(self.x_max, b_max)
        self.sample = self._merge(rows)

    def _merge(self, rows: Tensor) -> Tensor:
        cap = max(1, self.max_values // rows.shape[0])
        gen = self._generator(rows.device, self.seed)
        if rows.shape[1] > cap:
            rows = rows[:, torch.randperm(rows.shape[1], generator=gen, device=rows.device)[:cap]]
        old = self.sample
        if old is None:
            return rows
        if old.shape[1] + rows.shape[1] <= cap:
            return torch.cat([old, rows], dim=1)
        n_new = min(rows.shape[1], max(1, round(cap / self.batches)))
        n_old = min(old.shape[1], cap - n_new)
        keep_old = torch.randperm(old.shape[1], generator=gen, device=old.device)[:n_old]
        keep_new = torch.randperm(rows.shape[1], generator=gen, device=rows.device)[:n_new]
        return torch.cat([old[:, keep_old], rows[:, keep_new]], dim=1)  # (G, <= cap)

    def qparams(self, spec: QuantSpec) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) of the clipped range of least Lp error on the subsample, (*keepdim)."""
        self._check_spec(spec)
        assert self.x_min is not None and self.x_max is not None and self.sample is not None
        groups = self.sample.shape[0]
        row_spec = replace(spec, granularity="sample", group_size=0)  # one group per row of the sample
        row_min, row_max = self.x_min.reshape(groups, 1), self.x_max.reshape(groups, 1)
        scale, zero_point = lp_search_qparams(self.sample, row_min, row_max, row_spec, grid=self.grid, p=self.p)
        return scale.reshape(self.x_min.shape), zero_point.reshape(self.x_min.shape)


_KINDS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(kind: ObserverKind, spec: Optional[QuantSpec] = None, **kwargs: Any) -> Observer:
    """An observer of ``kind``; with ``spec``, it reduces with the spec's granularity and channel axis.

    Other keyword arguments go to the class (``momentum``, ``percentile``, ``p``, ``grid``,
    ``max_values``, ``seed``, or ``granularity`` / ``channel_axis`` when no spec is given).
    """
    if kind not in _KINDS:
        raise ValueError(f"observer kind must be one of {get_args(ObserverKind)}, got {kind!r}")
    if spec is not None:
        if "granularity" in kwargs or "channel_axis" in kwargs:
            raise TypeError("give either spec or granularity/channel_axis, not both")
        kwargs = {**kwargs, "granularity": spec.granularity, "channel_axis": spec.channel_axis}
    return _KINDS[kind](**kwargs)
