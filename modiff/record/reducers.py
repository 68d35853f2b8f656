"""Streaming statistics of activations, computed and accumulated on the tensor's device.

A reducer sees the observations of one key (site, capture, raw|diff, step, call): `update(x)` once per
observed tensor (one batch), `result()` at the end. Updates run only device kernels: no `.item()`, no
host synchronisation; `result()` moves the state to the CPU once (`results.results_of` does it for many
reducers with one copy, and the built-ins turn the states of many keys into results at once:
`finish_columns`). The recorder updates the reducers of the raw and the diff key of a site together
(`update_group` on a stacked `batched.Observation`), so the passes over the data are shared.

Notation: x one observed tensor (B, C, ...) flattened to d = x.numel() values, n the number of values
seen so far, sigma the population standard deviation (ddof 0), ||x|| the Euclidean (L2) norm.

    Stats          min, max, absmax, mean, std, l2 = ||all values||, l2_per_sample = mean_b ||x_b||, count
    ChannelAbsMax  absmax per channel (dim 1): max |x[:, c, ...]|                      -> array (C,)
    Histogram      counts in `bins` equal bins over [lo, hi] (bin j: lo + j w <= x < lo + (j + 1) w,
                   w = (hi - lo) / bins, hi itself in the last bin), plus underflow (< lo) and overflow
                   (> hi or NaN). Range: given, or fixed at the first observation to +-scale * absmax,
                   per site (shared by every step and call of the site: comparable across steps) or per key
    Quantiles      histogram-based: the value where the binned CDF reaches q, interpolated linearly
                   inside the bin. It estimates the inverse empirical CDF (numpy method "inverted_cdf",
                   the ceil(q n)-th smallest value) within one bin width while the data lie inside the range
    Outliers       fraction of |x| > k * sigma for each k (sigma of the same update's tensor), and of
                   |x| > threshold; NaN counts as an outlier

Stats merges per-sample mean and variance (float32 Welford passes) in float64 with Chan's formula.
Histograms keep ge_j = #{x >= edge_j}, whose differences are the bin counts.

Device memory per key (int64 counts): Histogram(bins) 8 (bins + 1) bytes, Quantiles(bins) the same,
ChannelAbsMax 4 C bytes, Stats and Outliers a few scalars. The defaults take about 11 KB per key: for the
CIFAR-10 UNet (113 sites) over 100 steps, raw and diff, about 250 MB.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, get_args

import numpy as np
import torch

from modiff.record.results import Beyond, Columns, Grid, Observation, ResultBatch, Slot, fixed_range, results_of, update_rows

__all__ = ["Reducer", "Stats", "ChannelAbsMax", "Histogram", "Quantiles", "Outliers", "default_reducers", "RangeScope"]

Result = dict[str, Any]  # name -> float or np.ndarray
RangeScope = Literal["site", "key"]
State = dict[str, "torch.Tensor | Slot"]


class Reducer:
    """Base class: `update(x)` per observed tensor, `result()` -> dict of floats and arrays.

    A subclass implements either `update(x)` and `result()` (simple, one tensor at a time), or the
    batched protocol used by the built-ins: `update_group(reducers, obs)` updates one reducer per row of
    `obs` (and may return a counting block, whose counts arrive in `take_counts`), `state()` returns the
    device tensors of the result and `finish(host_state)` turns their host copies into the result, or
    `finish_columns(reducers, stacked_states)` the states of many reducers at once into host columns.
    """

    placed: Optional[State] = None  # where an engine keeps the state instead (`place`); None: the reducer's tensors

    def __init__(self, name: str):
        if not name or "/" in name or "." in name:
            raise ValueError(f"reducer name must be non-empty without '/' or '.', got {name!r}")
        self.name = name

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-friendly), enough to build an empty copy."""
        return {"name": self.name}

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, **self.params()}

    def spawn(self, shared: dict[str, Any]) -> "Reducer":
        """An empty reducer with the same settings. `shared` is one dict per (site, capture, raw|diff)
        handed to the reducers of every step and call of that site (for per-site histogram ranges)."""
        return type(self)(**self.params())

    def place(self, state: State) -> None:
        """Keep the state where an engine updates it (regions of its arenas, `Slot`s); `state()` returns them."""
        self.placed = state

    def count_values(self, numel: int, samples: int) -> None:
        """An engine that updated `placed` itself reports how many values (in how many samples) it saw,
        for the host-side counters that `finish` reads (none here)."""

    def update(self, x: torch.Tensor) -> None:
        if type(self).update_group.__func__ is Reducer.update_group.__func__:  # type: ignore[attr-defined]
            raise NotImplementedError(f"{type(self).__name__} implements neither update nor update_group")
        update_rows([[self]], Observation.of(x))

    @classmethod
    def update_group(cls, reducers: Sequence["Reducer"], obs: Observation) -> Optional[Grid | Beyond]:
        """Update `reducers[k]` with row k of `obs`; by default through each reducer's `update`."""
        for reducer, x in zip(reducers, obs.x):
            reducer.update(x)
        return None

    @classmethod
    def take_counts(cls, reducers: Sequence["Reducer"], ge: torch.Tensor, obs: Observation) -> None:
        """Receive ge = #{x >= b} (K, block size) for the block `update_group` returned."""
        raise NotImplementedError(f"{cls.__name__}.update_group returned a block but take_counts is missing")

    def state(self) -> Optional[State]:
        """Device tensors of the result ({} before any update), or None for reducers without `finish`."""
        return None

    def finish(self, host: dict[str, np.ndarray]) -> Result:
        """The result from the host copy of `state()`; by default through `finish_columns`."""
        if type(self).finish_columns.__func__ is Reducer.finish_columns.__func__:  # type: ignore[attr-defined]
            raise NotImplementedError(f"{type(self).__name__} implements neither finish nor finish_columns")
        states = {n: torch.as_tensor(a)[None] for n, a in host.items()}
        return ResultBatch([0], type(self).finish_columns([self], states)).rows()[0]

    @classmethod
    def finish_columns(cls, reducers: Sequence["Reducer"], states: dict[str, torch.Tensor]) -> Columns:
        """The results of many reducers of this class as host columns; `states` holds their states stacked
        (K, ...) on their device. By default through each reducer's `finish` on the host copies (results
        that share their names); the built-ins compute the columns at once, which keeps the results of a
        recording quick to collect (quantiles and histograms on the device)."""
        host = {name: t.cpu().numpy() for name, t in states.items()}
        return Columns.of([r.finish({name: a[k] for name, a in host.items()}) for k, r in enumerate(reducers)])

    def result(self) -> Result:
        if self.state() is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither result nor state/finish")
        return results_of([self])[0]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class Stats(Reducer):
    """min, max, absmax, mean, std (population), l2 (total), l2_per_sample (mean over dim 0), count.

    Mean and variance come from per-sample Welford passes merged with Chan's formula (numerically stable
    for large means), also across updates.
    """

    def __init__(self, name: str = "stats"):
        super().__init__(name)
        self.count = 0  # n, a host int: numel is known without a sync
        self.samples = 0
        self._state: Optional[torch.Tensor] = None  # (6,) float64: min, max, mean, M2, sum x^2, sum ||x_b||

    @classmethod
    def update_group(cls, reducers: Sequence["Stats"], obs: Observation) -> None:
        lo, hi = obs.minmax
        state = torch.cat([torch.stack([lo, hi], dim=1), obs.moments], dim=1)  # (K, 6) float64
        for reducer, row in zip(reducers, state):
            reducer._state = row if reducer._state is None else _merge_stats(reducer._state, reducer.count, row, obs.numel)
            reducer.count += obs.numel
            reducer.samples += obs.samples

    def count_values(self, numel: int, samples: int) -> None:
        self.count += numel
        self.samples += samples

    def state(self) -> State:
        if self.placed is not None:
            return self.placed
        return {} if self._state is None else {"state": self._state}

    @classmethod
    def finish_columns(cls, reducers: Sequence["Stats"], states: dict[str, torch.Tensor]) -> Columns:
        if not states:
            return Columns({}, {})
        lo, hi, mean, m2, sumsq, norm_sum = states["state"].cpu().numpy().astype(np.float64).T
        count = np.array([r.count for r in reducers], dtype=np.float64)
        samples = np.array([r.samples for r in reducers], dtype=np.float64)
        return Columns({
            "min": lo, "max": hi, "absmax": np.where(np.abs(hi) > np.abs(lo), np.abs(hi), np.abs(lo)), "mean": mean,
            "std": np.sqrt(np.where(m2 < 0.0, 0.0, m2) / count), "l2": np.sqrt(sumsq),
            "l2_per_sample": norm_sum / samples, "count": count,
        }, {})


def _merge_stats(a: torch.Tensor, n_a: int, b: torch.Tensor, n_b: int) -> torch.Tensor:
    """Chan's merge of two Stats states over n_a and n_b values."""
    delta = b[2] - a[2]
    total = n_a + n_b
    mean = a[2] + delta * (n_b / total)
    m2 = a[3] + b[3] + delta.square() * (n_a * n_b / total)
    return torch.cat([torch.minimum(a[:1], b[:1]), torch.maximum(a[1:2], b[1:2]), torch.stack([mean, m2]), a[4:] + b[4:]])


class ChannelAbsMax(Reducer):
    """max |x| per channel (the channel axis `dim`, 1 by default): an array of length C."""

    def __init__(self, dim: int = 1, name: str = "channel_absmax"):
        super().__init__(name)
        self.dim = dim
        self._absmax: Optional[torch.Tensor] = None

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "name": self.name}

    @classmethod
    def update_group(cls, reducers: Sequence["ChannelAbsMax"], obs: Observation) -> None:
        dim, ndim = reducers[0].dim, obs.x.ndim - 1
        if ndim <= dim:
            raise ValueError(f"ChannelAbsMax(dim={dim}) needs a tensor with more than {dim} dims, got shape {tuple(obs.x.shape[1:])}")
        if dim == 1:
            lo, hi = obs.channel_minmax
            absmax = torch.maximum(hi, lo.neg())  # (K, C)
        else:
            absmax = obs.x.abs().amax(dim=[d + 1 for d in range(ndim) if d != dim])
        for reducer, new in zip(reducers, absmax):
            old = reducer._absmax
            if old is not None and old.shape != new.shape:
                raise ValueError(f"ChannelAbsMax: {new.numel()} channels now, {old.numel()} before")
            reducer._absmax = new if old is None else torch.maximum(old, new)

    def state(self) -> State:
        if self.placed is not None:
            return self.placed
        return {} if self._absmax is None else {"absmax": self._absmax}

    @classmethod
    def finish_columns(cls, reducers: Sequence["ChannelAbsMax"], states: dict[str, torch.Tensor]) -> Columns:
        return Columns({}, {"absmax": states["absmax"].cpu().numpy().astype(np.float64)} if states else {})


class Histogram(Reducer):
    """Counts in `bins` equal bins over [lo, hi] with underflow/overflow counts.

    range: (lo, hi) fixed, or None: +-scale * absmax of the first observation, fixed from then on, for
    the whole site (`per="site"`, comparable across steps) or for each (site, step, call) key (`per="key"`).
    A value equal to hi falls in the last bin (as torch.histc); NaN counts as overflow.
    """

    def __init__(self, bins: int = 256, range: Optional[tuple[float, float]] = None, *, scale: float = 1.5,
                 per: RangeScope = "site", name: str = "histogram"):
        super().__init__(name)
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if range is not None and not (len(range) == 2 and float(range[0]) < float(range[1])):
            raise ValueError(f"range must be (lo, hi) with lo < hi, got {range!r}")
        if per not in get_args(RangeScope):
            raise ValueError(f"per must be one of {get_args(RangeScope)}, got {per!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.bins, self.scale, self.per = int(bins), float(scale), per
        self.range = None if range is None else (float(range[0]), float(range[1]))
        self._shared: dict[str, Any] = {}
        self._lo_hi: Optional[torch.Tensor] = None  # (2,) float32 on the device
        self._ge: Optional[torch.Tensor] = None  # (bins + 1,) int64: #{x >= edge_j} for j < bins, #{x > hi}
        self._n = 0

    def params(self) -> dict[str, Any]:
        return {"bins": self.bins, "range": self.range, "scale": self.scale, "per": self.per, "name": self.name}

    def spawn(self, shared: dict[str, Any]) -> "Histogram":
        new = type(self)(**self.params())
        if self.per == "site":
            new._shared = shared.setdefault(f"range:{self.name}", {})
        return new

    @classmethod
    def update_group(cls, reducers: Sequence["Histogram"], obs: Observation) -> Grid:
        auto: Optional[torch.Tensor] = None
        for k, reducer in enumerate(reducers):
            if reducer._lo_hi is not None:
                continue
            if reducer.range is not None:
                reducer._lo_hi = fixed_range(*reducer.range, obs.x.device)
            elif "lo_hi" in reducer._shared:
                reducer._lo_hi = reducer._shared["lo_hi"].to(obs.x.device)
            else:
                if auto is None:
                    half = (reducer.scale * obs.absmax).clamp_min(torch.finfo(torch.float32).tiny)
                    auto = torch.stack([-half, half], dim=1)  # (K, 2)
                reducer._lo_hi = reducer._shared["lo_hi"] = auto[k]
        lo_hi = torch.stack([r._lo_hi for r in reducers])
        return Grid(lo_hi[:, 0], lo_hi[:, 1], reducers[0].bins)

    @classmethod
    def take_counts(cls, reducers: Sequence["Histogram"], ge: torch.Tensor, obs: Observation) -> None:
        for reducer, row in zip(reducers, ge):
            reducer._ge = row if reducer._ge is None else reducer._ge + row
            reducer._n += obs.numel

    def count_values(self, numel: int, samples: int) -> None:
        self._n += numel

    def state(self) -> State:
        if self.placed is not None:
            return self.placed
        return {} if self._ge is None else {"ge": self._ge, "lo_hi": self._lo_hi}

    @classmethod
    def finish_columns(cls, reducers: Sequence["Histogram"], states: dict[str, torch.Tensor]) -> Columns:
        if not states:
            return Columns({}, {})
        ge = states["ge"]
        counts, edges = (ge[:, :-1] - ge[:, 1:]).cpu().numpy(), bin_edges(states["lo_hi"], ge.shape[1] - 1).cpu().numpy()
        first, over = ge[:, 0].cpu().numpy(), ge[:, -1].cpu().numpy()
        under = np.array([r._n for r in reducers], dtype=np.int64) - first
        return Columns({"underflow": under.astype(np.float64), "overflow": over.astype(np.float64)},
                       {"counts": counts, "edges": edges})


def bin_edges(lo_hi: torch.Tensor, bins: int, at: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Edges of `bins` equal bins over each row's [lo, hi] of lo_hi (K, 2): np.linspace(lo, hi, bins + 1)
    row by row, the same float64 values (j w + lo with w = (hi - lo) / bins; hi itself last). `at` (K, Q):
    only the edges of these indices."""
    lo, hi = lo_hi[:, :1].double(), lo_hi[:, 1:].double()
    j = torch.arange(bins + 1, dtype=torch.float64, device=lo_hi.device)[None, :] if at is None else at.double()
    return torch.where(j == bins, hi, j * ((hi - lo) / bins) + lo)


def quantiles_from_ge(ge: torch.Tensor, n: torch.Tensor, lo_hi: torch.Tensor, qs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles of K histograms kept as ge (K, bins + 1) = #{x >= edge_j} over n (K,) values in the bins of
    lo_hi (K, 2), on their device: where the binned CDF (underflow first) reaches q n, linear inside the
    bin, clipped to [lo, hi]. Returns the (K, Q) values and the (K,) fraction outside [lo, hi] (float64)."""
    k, bins = ge.shape[0], ge.shape[1] - 1
    ge, total = ge.double(), n.double()  # integers below 2^53: exact; total = counts + underflow + overflow
    under, over = total - ge[:, 0], ge[:, -1]
    cum = torch.cat([ge.new_zeros(k, 1), (ge[:, :-1] - ge[:, 1:]).cumsum(dim=1)], dim=1) + under[:, None]  # CDF at each edge
    targets = torch.tensor(qs, dtype=torch.float64, device=ge.device)[None, :] * total[:, None]
    j = (torch.searchsorted(cum, targets, side="left") - 1).clamp(0, bins - 1)  # cum[j] < target <= cum[j + 1] inside
    cum_j, cum_next = cum.gather(1, j), cum.gather(1, j + 1)
    edge_j, edge_next = bin_edges(lo_hi, bins, j), bin_edges(lo_hi, bins, j + 1)
    inside = edge_j + (targets - cum_j) / (cum_next - cum_j).clamp_min(1e-300) * (edge_next - edge_j)
    first, last = lo_hi[:, :1].double(), lo_hi[:, 1:].double()
    values = torch.where(targets <= cum[:, :1], first, torch.where(targets >= cum[:, -1:], last, inside))
    return torch.where(total[:, None] == 0, torch.nan, values), (under + over) / total


_DEFAULT_QS = (0.0001, 0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999, 0.9999)


class Quantiles(Reducer):
    """Quantiles from a fine histogram (default 1024 bins, range per key: +-1.5 * first absmax).

    Result keys read q0.5, q0.999, ...; values outside the histogram's range are reported as its edge,
    and the fraction outside as `outside`.
    """

    def __init__(self, qs: Sequence[float] = _DEFAULT_QS, bins: int = 1024, *, scale: float = 1.5,
                 per: RangeScope = "key", name: str = "quantiles"):
        super().__init__(name)
        self.qs = tuple(float(q) for q in qs)
        if not self.qs or any(not 0.0 <= q <= 1.0 for q in self.qs):
            raise ValueError(f"qs must be probabilities in [0, 1], got {qs!r}")
        self._hist = Histogram(bins, scale=scale, per=per, name=name)

    def params(self) -> dict[str, Any]:
        h = self._hist
        return {"qs": list(self.qs), "bins": h.bins, "scale": h.scale, "per": h.per, "name": self.name}

    def spawn(self, shared: dict[str, Any]) -> "Quantiles":
        new = type(self)(**self.params())
        new._hist = self._hist.spawn(shared)
        return new

    @classmethod
    def update_group(cls, reducers: Sequence["Quantiles"], obs: Observation) -> Grid:
        return Histogram.update_group([r._hist for r in reducers], obs)

    @classmethod
    def take_counts(cls, reducers: Sequence["Quantiles"], ge: torch.Tensor, obs: Observation) -> None:
        Histogram.take_counts([r._hist for r in reducers], ge, obs)

    def place(self, state: State) -> None:
        self._hist.place(state)

    def count_values(self, numel: int, samples: int) -> None:
        self._hist.count_values(numel, samples)

    def state(self) -> State:
        return self._hist.state()

    @classmethod
    def finish_columns(cls, reducers: Sequence["Quantiles"], states: dict[str, torch.Tensor]) -> Columns:
        if not states:
            return Columns({}, {})
        qs = reducers[0].qs
        if any(r.qs != qs for r in reducers):
            raise ValueError("Quantiles.finish_columns: reducers of one batch must ask for the same qs")
        n = torch.tensor([r._hist._n for r in reducers], device=states["ge"].device)
        values, outside = (t.cpu().numpy() for t in quantiles_from_ge(states["ge"], n, states["lo_hi"], qs))
        return Columns({**{f"q{q:g}": values[:, j] for j, q in enumerate(qs)}, "outside": outside}, {})


class Outliers(Reducer):
    """Fraction of values with |x| > k * sigma for each k (sigma of the same tensor), and > `threshold`.

    Keys: outliers_3std, outliers_6std, outliers_gt_<threshold>.
    """

    def __init__(self, ks: Sequence[float] = (3.0, 6.0), threshold: Optional[float] = None, name: str = "outliers"):
        super().__init__(name)
        self.ks = tuple(float(k) for k in ks)
        self.threshold = None if threshold is None else float(threshold)
        if not self.ks and self.threshold is None:
            raise ValueError("Outliers needs at least one k or a threshold")
        self.count = 0
        self._hits: Optional[torch.Tensor] = None  # (len(ks) + [1 if threshold],) int64: #{|x| > limit}

    def params(self) -> dict[str, Any]:
        return {"ks": list(self.ks), "threshold": self.threshold, "name": self.name}

    @classmethod
    def update_group(cls, reducers: Sequence["Outliers"], obs: Observation) -> Beyond:
        first = reducers[0]
        limits = [obs.sigma * k for k in first.ks]  # float32, (K,) each
        if first.threshold is not None:
            limits.append(torch.full_like(obs.sigma, first.threshold))
        return Beyond(torch.stack(limits, dim=1))

    @classmethod
    def take_counts(cls, reducers: Sequence["Outliers"], ge: torch.Tensor, obs: Observation) -> None:
        for reducer, row in zip(reducers, ge):
            reducer._hits = row if reducer._hits is None else reducer._hits + row
            reducer.count += obs.numel

    def count_values(self, numel: int, samples: int) -> None:
        self.count += numel

    def state(self) -> State:
        if self.placed is not None:
            return self.placed
        return {} if self._hits is None else {"hits": self._hits}

    @classmethod
    def finish_columns(cls, reducers: Sequence["Outliers"], states: dict[str, torch.Tensor]) -> Columns:
        if not states:
            return Columns({}, {})
        first = reducers[0]
        names = [f"outliers_{k:g}std" for k in first.ks] + ([f"outliers_gt_{first.threshold:g}"] if first.threshold is not None else [])
        if any(r.ks != first.ks or r.threshold != first.threshold for r in reducers):
            raise ValueError("Outliers.finish_columns: reducers of one batch must share ks and threshold")
        fraction = states["hits"].cpu().numpy().astype(np.float64) / np.array([r.count for r in reducers], dtype=np.float64)[:, None]
        return Columns({name: fraction[:, j] for j, name in enumerate(names)}, {})


def default_reducers() -> list[Reducer]:
    """Stats, ChannelAbsMax, Histogram(256) (range per site), Quantiles, Outliers(3, 6)."""
    return [Stats(), ChannelAbsMax(), Histogram(256), Quantiles(), Outliers()]
