"""Observers for static qparams: running statistics pinned against hand and numpy values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modiff.quant.observers import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from modiff.quant.primitives import QuantSpec, fake_quantize, qparams_from_range


def batches(n: int, shape: tuple[int, ...] = (4, 3, 5, 5), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (i + 1) + i for i in range(n)]


def student_t(shape: tuple[int, ...], df: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded Student-t samples: Z / sqrt(chi2_df / df) from normals only."""
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((df, *shape), generator=gen).square().sum(0)
    return z / (chi2 / df).sqrt()


def lp_error(x: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor], spec: QuantSpec, p: float) -> float:
    return float((x - fake_quantize(x, *qparams, spec)).abs().pow(p).sum())


def test_minmax_equals_global_range_tensor_and_channel() -> None:
    data = batches(3)
    everything = torch.cat(data)
    obs = MinMaxObserver()
    for x in data:
        obs.update(x)
    assert obs.x_min is not None and obs.x_max is not None
    assert obs.x_min.shape == (1, 1, 1, 1)
    assert obs.x_min.item() == everything.min().item() and obs.x_max.item() == everything.max().item()
    spec = QuantSpec(bits=8)
    scale, zero_point = obs.qparams(spec)
    ref = qparams_from_range(everything.min().reshape(1, 1, 1, 1), everything.max().reshape(1, 1, 1, 1), spec)
    assert torch.equal(scale, ref[0]) and torch.equal(zero_point, ref[1])

    obs = make_observer("minmax", spec=QuantSpec(granularity="channel"))
    for x in data:
        obs.update(x)
    assert torch.equal(obs.x_min, everything.amin(dim=(0, 2, 3), keepdim=True))
    assert torch.equal(obs.x_max, everything.amax(dim=(0, 2, 3), keepdim=True))
    assert obs.qparams(QuantSpec(bits=4, granularity="channel"))[0].shape == (1, 3, 1, 1)


def test_ema_formula_by_hand() -> None:
    obs = EMAObserver(momentum=0.9)
    obs.update(torch.tensor([[-1.0, 0.5, 2.0]]))
    obs.update(torch.tensor([[-3.0, 0.0, 1.0]]))
    assert obs.x_min is not None and obs.x_max is not None
    assert obs.x_min.item() == pytest.approx(0.9 * -1 + 0.1 * -3)  # -1.2
    assert obs.x_max.item() == pytest.approx(0.9 * 2 + 0.1 * 1)  # 1.9
    obs.update(torch.tensor([[0.0, 10.0]]))
    assert obs.x_max.item() == pytest.approx(0.9 * 1.9 + 0.1 * 10)


def test_percentile_matches_numpy_without_subsampling() -> None:
    data = batches(2, shape=(8, 4, 16, 16))
    obs = PercentileObserver(percentile=99.0)
    for x in data:
        obs.update(x)
    lows = [np.percentile(x.numpy(), 1.0) for x in data]
    highs = [np.percentile(x.numpy(), 99.0) for x in data]
    assert obs.x_min is not None and obs.x_max is not None
    assert obs.x_min.item() == pytest.approx(np.mean(lows), rel=1e-5)
    assert obs.x_max.item() == pytest.approx(np.mean(highs), rel=1e-5)


def test_percentile_channel_and_subsampled() -> None:
    x = torch.randn(16, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    x[:, 1] *= 10
    obs = PercentileObserver(granularity="channel", percentile=99.9, max_values=2**14, seed=3)
    obs.update(x)  # 2^15 values per channel, 2^13 kept per channel
    ref = np.percentile(x.transpose(0, 1).reshape(2, -1).numpy(), 99.9, axis=1)
    assert obs.x_max is not None and obs.x_max.shape == (1, 2, 1, 1)
    assert np.allclose(obs.x_max.flatten().numpy(), ref, rtol=0.1)
    again = PercentileObserver(granularity="channel", percentile=99.9, max_values=2**14, seed=3)
    again.update(x)
    assert torch.equal(again.x_max, obs.x_max)  # seeded subsample: deterministic


def test_mse_observer_clips_heavy_tails() -> None:
    gen = torch.Generator().manual_seed(2)
    data = [student_t((8, 4, 8, 8), 2, gen) for _ in range(3)]
    spec = QuantSpec(bits=4)
    minmax, mse = MinMaxObserver(), MSEObserver(p=2.4)
    for x in data:
        minmax.update(x)
        mse.update(x)
    everything = torch.cat(data)
    q_minmax, q_mse = minmax.qparams(spec), mse.qparams(spec)
    assert q_mse[0] <= q_minmax[0]  # a range no wider than min-max
    assert lp_error(everything, q_mse, spec, 2.4) < 0.97 * lp_error(everything, q_minmax, spec, 2.4)


def test_mse_observer_channel_and_memory_budget() -> None:
    spec = QuantSpec(bits=3, scheme="symmetric-published", granularity="channel")
    obs = make_observer("mse", spec=spec, max_values=3 * 500, grid=50)
    assert isinstance(obs, MSEObserver)
    data = batches(6, shape=(4, 3, 10, 10))  # 400 values per channel and batch
    for x in data:
        obs.update(x)
        assert obs.sample is not None and obs.sample.shape[0] == 3 and obs.sample.shape[1] <= 500
    scale, zero_point = obs.qparams(spec)
    assert scale.shape == zero_point.shape == (1, 3, 1, 1)
    everything = torch.cat(data)
    minmax = MinMaxObserver(granularity="channel")
    for x in data:
        minmax.update(x)
    assert (scale <= minmax.qparams(spec)[0] * (1 + 1e-6)).all()
    same = make_observer("mse", spec=spec, max_values=3 * 500, grid=50)
    for x in data:
        same.update(x)
    assert torch.equal(same.qparams(spec)[0], scale)  # seeded: deterministic
    assert torch.isfinite(fake_quantize(everything, scale, zero_point, spec)).all()


def test_one_observation_serves_several_bit_widths() -> None:
    obs = MinMaxObserver()
    obs.update(torch.tensor([[-1.0, 2.0]]))
    assert obs.qparams(QuantSpec(bits=2))[0].item() == 1.0
    assert obs.qparams(QuantSpec(bits=4))[0].item() == pytest.approx(3 / 15)


def test_observer_errors() -> None:
    with pytest.raises(ValueError, match=r"observer kind must be one of \('minmax', 'ema', 'percentile', 'mse'\), got 'max'"):
        make_observer("max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has observed no data"):
        MinMaxObserver().qparams(QuantSpec())
    per_sample = make_observer("minmax", spec=QuantSpec(granularity="sample"))  # constructing is fine
    with pytest.raises(ValueError, match=r"static qparams need granularity in \('tensor', 'channel'\), got 'sample'"):
        per_sample.update(torch.randn(2, 3))
    make_observer("ema", spec=QuantSpec(granularity="group", group_size=2))  # unused by dynamic layers
    obs = MinMaxObserver()
    obs.update(torch.randn(2, 3))
    with pytest.raises(ValueError, match="granularity 'tensor'.*asked for granularity 'channel'"):
        obs.qparams(QuantSpec(granularity="channel"))
    channel = MinMaxObserver(granularity="channel")
    channel.update(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="must agree in ndim and channels"):
        channel.update(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="momentum"):
        EMAObserver(momentum=1.0)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=30.0)
