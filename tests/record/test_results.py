"""Collecting results: the column batches of many reducers, the quantiles of many histograms at once, and
the statistics table built from them."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from modiff.record import Histogram, Quantiles, Reducer, Stats
from modiff.record.results import Columns, results_of, result_batches
from modiff.record.reducers import bin_edges, quantiles_from_ge
from modiff.record.store import results_to_tables


def _quantile_by_hand(counts: np.ndarray, edges: np.ndarray, under: float, over: float, q: float) -> float:
    """One quantile, one histogram, step by step: where the binned CDF (underflow first) reaches q n."""
    total = counts.sum() + under + over
    cum = [under]
    for c in counts:
        cum.append(cum[-1] + c)
    target = q * total
    if target <= cum[0]:
        return float(edges[0])
    if target >= cum[-1]:
        return float(edges[-1])
    j = next(j for j in range(len(counts)) if cum[j] < target <= cum[j + 1])
    return float(edges[j] + (target - cum[j]) / (cum[j + 1] - cum[j]) * (edges[j + 1] - edges[j]))


def test_quantiles_of_a_small_histogram_by_hand() -> None:
    # bins [0, 1), [1, 2), [2, 3] holding 1, 2, 1 values: ge = #{x >= edge} = 4, 3, 1 and #{x > 3} = 0
    ge, n, lo_hi = torch.tensor([[4, 3, 1, 0]]), torch.tensor([4]), torch.tensor([[0.0, 3.0]])
    values, outside = quantiles_from_ge(ge, n, lo_hi, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert values.tolist() == [[0.0, 1.0, 1.5, 2.0, 3.0]]  # 0.5: halfway through the 2 values of [1, 2)
    assert outside.tolist() == [0.0]
    # one value below the range and one above: n = 6, the CDF starts at 1
    values, outside = quantiles_from_ge(torch.tensor([[5, 4, 2, 1]]), torch.tensor([6]), lo_hi, [0.1, 0.5, 0.99])
    assert values.tolist() == [[0.0, 1.5, 3.0]]  # 0.1 n = 0.6 lies in the underflow: the lower edge
    assert outside.tolist() == [2 / 6]


def test_quantiles_of_many_histograms_equal_one_at_a_time() -> None:
    rng = np.random.default_rng(0)
    qs = [0.0, 0.001, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0]
    counts = rng.integers(0, 5, size=(40, 16)) * (rng.random((40, 16)) < 0.6)
    under, over = rng.integers(0, 3, size=40), rng.integers(0, 3, size=40)
    ge = np.concatenate([np.cumsum(counts[:, ::-1], axis=1)[:, ::-1] + over[:, None], over[:, None]], axis=1)
    n = counts.sum(1) + under + over
    lo = rng.normal(size=40).astype(np.float32)
    lo_hi = np.stack([lo, lo + rng.random(40).astype(np.float32) * 3 + 0.1], axis=1)
    values, outside = quantiles_from_ge(torch.from_numpy(ge), torch.from_numpy(n), torch.from_numpy(lo_hi), qs)
    for k in range(40):
        edges = np.linspace(float(lo_hi[k, 0]), float(lo_hi[k, 1]), 17)
        expected = [_quantile_by_hand(counts[k], edges, under[k], over[k], q) for q in qs]
        np.testing.assert_allclose(values[k].numpy(), expected, rtol=1e-12, atol=1e-12)
        assert float(outside[k]) == pytest.approx((under[k] + over[k]) / n[k])


def test_bin_edges_are_linspace_row_by_row() -> None:
    rng = np.random.default_rng(1)
    lo = rng.normal(size=50).astype(np.float32) * 10
    lo_hi = np.stack([lo, lo + rng.random(50).astype(np.float32) * 5 + 1e-3], axis=1)
    for bins in (1, 7, 256, 1024):
        edges = bin_edges(torch.from_numpy(lo_hi), bins).numpy()
        for k in range(50):
            assert np.array_equal(edges[k], np.linspace(float(lo_hi[k, 0]), float(lo_hi[k, 1]), bins + 1))


class _Median(Reducer):
    """A reducer of one tensor at a time (update/result): collected on its own."""

    def __init__(self, name: str = "median"):
        super().__init__(name)
        self.values: list[float] = []

    def update(self, x: torch.Tensor) -> None:
        self.values.append(float(x.median()))

    def result(self) -> dict[str, Any]:
        return {"median": float(np.median(self.values))} if self.values else {}


def test_batches_by_class_and_name_and_their_rows() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    reducers: list[Reducer] = [Stats(), Quantiles(qs=[0.5], bins=8), Stats(name="other"), _Median(), Stats(),
                                Histogram(4, range=(0.0, 12.0))]
    for r in reducers:
        r.update(x)
    batches = result_batches(reducers)
    assert sorted(sorted(b.index) for b in batches) == [[0, 4], [1], [2], [3], [5]]
    results = results_of(reducers)
    assert results[0] == results[4] and results[0]["max"] == 11.0 and results[0]["count"] == 12.0
    assert isinstance(results[0]["mean"], float) and results[3] == {"median": 5.0}  # torch: the lower median
    assert results[5]["counts"].tolist() == [3, 3, 3, 3] and results[5]["underflow"] == 0.0
    assert math.isclose(results[1]["q0.5"], 5.5, abs_tol=0.75)  # within one bin width


def test_statistics_table_rows_follow_results_then_statistics() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    reducers: list[Reducer] = [Stats(), Histogram(2, range=(-4.0, 4.0)), Stats()]
    for r in reducers:
        r.update(x)
    keys = [("a", "input", "raw", 0, 0), ("a", "input", "raw", 0, 0), ("b", "input", "diff", 1, 0)]
    frame, arrays = results_to_tables(keys, ["stats", "histogram", "stats"], result_batches(reducers), {0: 999})
    stats = ["min", "max", "absmax", "mean", "std", "l2", "l2_per_sample", "count"]
    assert frame["statistic"].tolist() == stats + ["underflow", "overflow"] + stats
    assert frame["site"].tolist() == ["a"] * 10 + ["b"] * 8
    assert frame["t"].tolist() == [999] * 10 + [pd.NA] * 8
    assert frame.dtypes["step"] == np.int64 and str(frame.dtypes["t"]) == "Int64"
    assert frame["value"].tolist()[:4] == [-2.0, 4.0, 4.0, 1.5]
    assert list(arrays) == ["a/input/raw/step=000/call=0/histogram.counts", "a/input/raw/step=000/call=0/histogram.edges"]
    assert arrays["a/input/raw/step=000/call=0/histogram.counts"].tolist() == [1, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantiles_on_the_gpu_equal_the_cpu() -> None:
    """The same float64 operations on both devices: bit-equal results."""
    g = torch.Generator().manual_seed(2)
    counts = torch.randint(0, 50, (300, 1026), generator=g)
    ge = counts.sum(1, keepdim=True) - counts.cumsum(1)[:, :-1]
    n = counts.sum(1)
    lo = torch.randn(300, generator=g)
    lo_hi = torch.stack([lo, lo + torch.rand(300, generator=g) + 0.01], dim=1)
    qs = [0.0001, 0.01, 0.5, 0.99, 0.9999]
    cpu = quantiles_from_ge(ge, n, lo_hi, qs)
    gpu = quantiles_from_ge(ge.cuda(), n.cuda(), lo_hi.cuda(), qs)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_columns_of_results_with_different_names_say_what_to_do() -> None:
    assert Columns.of([{"a": 1.0, "b": np.arange(2)}, {"a": 2, "b": np.arange(2)}]).scalars["a"].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="must share their names.*implement finish_columns"):
        Columns.of([{"a": 1.0}, {"b": 2.0}])


def test_one_batch_of_quantiles_must_ask_for_the_same_qs() -> None:
    """Batches are keyed by class and name; two same-named Quantiles with different qs are refused."""
    reducers = [Quantiles(qs=[0.5], bins=8), Quantiles(qs=[0.9], bins=8)]
    for r in reducers:
        r.update(torch.arange(12, dtype=torch.float32).reshape(3, 4))
    with pytest.raises(ValueError, match="same qs"):
        results_of(reducers)
    reducers[1].name = "quantiles_90"
    assert list(results_of(reducers)[1]) == ["q0.9", "outside"]
