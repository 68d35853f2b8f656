"""Reducers against direct computations on the same tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modiff.record import ChannelAbsMax, Histogram, Outliers, Quantiles, Stats
from modiff.record.results import Observation, results_of, update_rows


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 5, 5, generator=g) * 2 + 1, torch.randn(2, 3, 5, 5, generator=g).pow(3) + 10]


def test_stats_merge_equals_statistics_of_the_concatenation() -> None:
    """Two updates (Chan's merge) give the statistics of both tensors together, even with a large mean."""
    xs = _tensors()
    stats = Stats()
    for x in xs:
        stats.update(x)
    got = stats.result()
    both = torch.cat(xs).double()
    per_sample = both.reshape(both.shape[0], -1).norm(dim=1)
    want = {"min": both.min(), "max": both.max(), "absmax": both.abs().max(), "mean": both.mean(),
            "std": both.std(correction=0), "l2": both.norm(), "l2_per_sample": per_sample.mean(), "count": both.numel()}
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), key


def test_channel_absmax_is_max_over_all_but_dim_1() -> None:
    xs = _tensors()
    reducer = ChannelAbsMax()
    for x in xs:
        reducer.update(x)
    want = torch.cat(xs).abs().amax(dim=(0, 2, 3))
    np.testing.assert_array_equal(reducer.result()["absmax"], want.double().numpy())


def test_histogram_matches_histc_with_under_and_overflow() -> None:
    """Fixed range: counts equal torch.histc; values outside the range are counted, not dropped."""
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 2
    x[:3] = torch.tensor([-1.5, 1.5, 1.5])  # both range edges: hi falls in the last bin, as in histc
    hist = Histogram(64, range=(-1.5, 1.5))
    hist.update(x[:6000])
    hist.update(x[6000:])
    got = hist.result()
    np.testing.assert_array_equal(got["counts"], torch.histc(x, 64, -1.5, 1.5).long().numpy())
    assert got["underflow"] == float((x < -1.5).sum()) and got["overflow"] == float((x > 1.5).sum())
    np.testing.assert_allclose(got["edges"], np.linspace(-1.5, 1.5, 65))


def test_histogram_range_fixed_at_first_observation_per_site() -> None:
    """range=None: +-1.5 * the first absmax, shared by the reducers spawned for one site."""
    template = Histogram(16)
    shared: dict = {}
    first, second = template.spawn(shared), template.spawn(shared)
    a = torch.tensor([-2.0, 0.5, 1.0])
    first.update(a)
    second.update(torch.tensor([10.0, 0.0]))
    assert first.result()["edges"][[0, -1]].tolist() == pytest.approx([-3.0, 3.0])
    assert second.result()["edges"][[0, -1]].tolist() == pytest.approx([-3.0, 3.0])
    assert second.result()["overflow"] == 1.0
    own = Histogram(16, per="key").spawn(shared)
    own.update(torch.tensor([10.0]))
    assert own.result()["edges"][-1] == pytest.approx(15.0)


def test_quantiles_within_one_bin_width() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(2)).exp()  # skewed
    qs = (0.001, 0.1, 0.5, 0.9, 0.999)
    reducer = Quantiles(qs, bins=512)
    reducer.update(x)
    got = reducer.result()
    width = 2 * 1.5 * float(x.abs().max()) / 512
    for q in qs:
        assert abs(got[f"q{q:g}"] - np.quantile(x.double().numpy(), q, method="inverted_cdf")) <= width, q
    assert got["outside"] == 0.0


def test_outlier_ratios() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3)).pow(3)
    reducer = Outliers(ks=(3, 6), threshold=2.5)
    reducer.update(x)
    got = reducer.result()
    sigma = x.std(correction=0)
    assert got["outliers_3std"] == pytest.approx(float((x.abs() > 3 * sigma).float().mean()))
    assert got["outliers_6std"] == pytest.approx(float((x.abs() > 6 * sigma).float().mean()))
    assert got["outliers_gt_2.5"] == pytest.approx(float((x.abs() > 2.5).float().mean()))
    assert 0 < got["outliers_6std"] < got["outliers_3std"]


@pytest.mark.parametrize("make, message", [
    (lambda: Histogram(0), "bins"),
    (lambda: Histogram(8, range=(1.0, -1.0)), "lo < hi"),
    (lambda: Quantiles((1.5,)), "probabilities"),
    (lambda: Outliers(ks=()), "at least one"),
])
def test_bad_arguments_say_what_is_allowed(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_empty_reducer_has_no_result() -> None:
    for reducer in (Stats(), ChannelAbsMax(), Histogram(), Quantiles(), Outliers()):
        assert reducer.result() == {}


@pytest.mark.parametrize("backend", ["grid", "search"])
def test_batched_rows_match_direct_computation_with_both_count_backends(backend: str) -> None:
    """Two rows reduced together (as raw and diff are): each row's counts equal histc and direct counts."""
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(2, 3, 4, 50, generator=g) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    rows[0, 0, 0, :3] = torch.tensor([-2.0, 2.0, 2.0])  # both edges of the fixed range
    rows[1, 0, 0, 0] = float("nan")  # overflow, and an outlier
    hist = [Histogram(16, range=(-2.0, 2.0)) for _ in range(2)]
    outliers = [Outliers(ks=(1.0, 2.0), threshold=2.5) for _ in range(2)]
    update_rows([[hist[0], outliers[0]], [hist[1], outliers[1]]], Observation(rows, backend))
    for k in range(2):
        x, got = rows[k], hist[k].result()
        finite = x[~x.isnan()]
        np.testing.assert_array_equal(got["counts"], torch.histc(finite, 16, -2.0, 2.0).long().numpy())
        assert got["underflow"] == float((x < -2).sum())
        assert got["overflow"] == float((x > 2).sum() + x.isnan().sum())
    sigma0 = rows[0].double().std(correction=0)
    want = {"outliers_1std": (rows[0].abs() > sigma0).double().mean(), "outliers_2std": (rows[0].abs() > 2 * sigma0).double().mean(),
            "outliers_gt_2.5": (rows[0].abs() > 2.5).double().mean()}
    assert outliers[0].result() == pytest.approx({k: float(v) for k, v in want.items()})
    assert outliers[1].result()["outliers_gt_2.5"] == pytest.approx(float(((rows[1].abs() > 2.5) | rows[1].isnan()).double().mean()))


def test_search_and_grid_backends_count_alike() -> None:
    """Random data (no value on a bin edge): the CUDA-style search backend equals the CPU grid backend."""
    x = torch.randn(2, 8, 3, 7, 7, generator=torch.Generator().manual_seed(5)).pow(3)
    got = {}
    for backend in ("grid", "search"):
        reducers = [[Histogram(64), Quantiles(bins=256), Outliers(threshold=0.5)] for _ in range(2)]
        update_rows(reducers, Observation(x, backend))
        got[backend] = results_of([r for row in reducers for r in row])
    for a, b in zip(got["grid"], got["search"]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_update_has_no_sync_and_matches_the_cpu() -> None:
    """On CUDA (search backend, torch.histc on int32 positions) the counts equal the CPU search backend's."""
    x = torch.randn(2, 16, 8, 9, 9, generator=torch.Generator().manual_seed(6)).pow(3)
    results = {}
    for device in ("cpu", "cuda"):
        reducers = [[Stats(), ChannelAbsMax(), Histogram(64), Quantiles(bins=256), Outliers(threshold=0.5)] for _ in range(2)]
        obs = Observation(x.to(device), "search")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            update_rows(reducers, obs)
            update_rows(reducers, obs)  # a second trajectory: the merge path
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results[device] = results_of([r for row in reducers for r in row])
    for cpu, gpu in zip(results["cpu"], results["cuda"]):
        for key in cpu:
            if key in ("counts", "underflow", "overflow") or key.startswith("outliers"):
                np.testing.assert_array_equal(cpu[key], gpu[key])
            else:
                np.testing.assert_allclose(cpu[key], gpu[key], rtol=1e-5, atol=1e-6)
