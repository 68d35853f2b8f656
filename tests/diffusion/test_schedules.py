"""Noise schedules and timestep sequences, pinned against the published (numpy) formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import modiff
from modiff.diffusion.schedules import NoiseSchedule, linear_schedule, sqrt_linear_schedule, timesteps


def test_linear_schedule_is_float64_linspace_cast_to_float32() -> None:
    """betas = float32(np.linspace(1e-4, 0.02, 1000) in float64), bit for bit."""
    s = linear_schedule()
    expected = np.linspace(1e-4, 0.02, 1000, dtype=np.float64).astype(np.float32)
    assert s.betas.dtype == torch.float32 and s.num_timesteps == 1000
    assert np.array_equal(s.betas.numpy(), expected)


def test_alpha_bar_is_float32_cumprod() -> None:
    """alpha_bar = cumprod(1 - betas) in float32, as the published DDIM code computes it."""
    s = linear_schedule()
    expected = torch.cumprod(1.0 - torch.from_numpy(np.linspace(1e-4, 0.02, 1000).astype(np.float32)), dim=0)
    assert s.alpha_bar.dtype == torch.float32
    assert torch.equal(s.alpha_bar, expected)
    assert s.alpha_bar_at(-1) == 1.0
    assert s.alpha_bar_at(999) == float(expected[999])
    np.testing.assert_allclose(float(expected[999]), np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        s.alpha_bar_at(1000)


def test_sqrt_linear_schedule() -> None:
    """LDM schedule: betas = float32(linspace(sqrt(a), sqrt(b))**2) computed in float64."""
    s = sqrt_linear_schedule()
    expected = (np.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=np.float64) ** 2).astype(np.float32)
    assert np.array_equal(s.betas.numpy(), expected)


def test_noise_schedule_validation() -> None:
    """Betas must be 1-D, of length >= 2 and strictly inside (0, 1)."""
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.full((2, 2), 0.1))
    with pytest.raises(ValueError, match="strictly between"):
        NoiseSchedule(torch.tensor([0.1, 1.0]))


def test_quad_timesteps_as_published() -> None:
    """'quad' = reversed(int(linspace(0, sqrt(800), 100)**2)): starts at 800 and holds t=0 four times."""
    ts = modiff.timesteps(100, "quad")
    expected = tuple(reversed([int(s) for s in np.linspace(0, np.sqrt(800), 100) ** 2]))
    assert ts == expected
    assert ts[0] == 800 and len(ts) == 100
    assert ts.count(0) == 4
    assert all(a >= b for a, b in zip(ts, ts[1:]))


def test_quad_unique_has_no_duplicates() -> None:
    """'quad-unique' is the quad sequence with repeats removed, still descending."""
    ts = timesteps(100, "quad-unique")
    assert len(set(ts)) == len(ts) < 100
    assert set(ts) == set(timesteps(100, "quad"))
    assert list(ts) == sorted(ts, reverse=True)


def test_uniform_timesteps() -> None:
    """'uniform' = reversed(range(0, T, T // S)); offset=1 shifts every step (LDM convention)."""
    assert timesteps(100) == tuple(reversed(range(0, 1000, 10)))
    assert timesteps(100, offset=1) == tuple(t + 1 for t in reversed(range(0, 1000, 10)))
    assert timesteps(1) == (0,)
    assert timesteps(10, num_timesteps=100) == tuple(reversed(range(0, 100, 10)))


def test_uniform_steps_not_dividing_T_follow_published_skip() -> None:
    """Published quirk kept: skip = T // S, so steps=400 gives 500 timesteps (documented, not a bug)."""
    assert len(timesteps(400)) == 500
    assert len(timesteps(300)) == 334


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 10, "spacing": "linear"}, "allowed: uniform, quad, quad-unique"),
        ({"steps": 0}, r"\[1, 1000\]"),
        ({"steps": 1001}, r"\[1, 1000\]"),
        ({"steps": 1000, "offset": 1}, "past T - 1"),
    ],
)
def test_timesteps_errors(kwargs: dict, match: str) -> None:
    """Bad spacing / steps / offset raise ValueError naming the allowed values."""
    with pytest.raises(ValueError, match=match):
        timesteps(**kwargs)


def test_ldm_timesteps_are_the_compvis_convention() -> None:
    """'ldm' = reversed(range(0, 1000, 1000 // S) + 1), as CompVis make_ddim_timesteps (uniform)."""
    for steps in (10, 50, 100, 200, 250):
        expected = tuple(reversed((np.asarray(range(0, 1000, 1000 // steps)) + 1).tolist()))
        assert timesteps(steps, "ldm") == expected
    assert timesteps(10, "ldm") == (901, 801, 701, 601, 501, 401, 301, 201, 101, 1)
    with pytest.raises(ValueError, match="reaches timestep 1000"):
        timesteps(1000, "ldm")  # range(0, 1000, 1) + 1 ends at 1000, which CompVis cannot index either


def test_final_alpha_bar_sets_the_last_ddim_step() -> None:
    """With final_alpha_bar = alpha_bar_0 (CompVis DDIM), the last step from t lands at
    sqrt(a_0) x0_pred + sqrt(1 - a_0) eps instead of x0_pred."""
    base = sqrt_linear_schedule(0.0015, 0.0155)
    schedule = NoiseSchedule(base.betas, final_alpha_bar=float(base.alpha_bar[0]))
    eps_value = 0.3
    x_t = torch.full((1, 1, 2, 2), 0.5)
    out = modiff.sample_ddim(lambda x, t: torch.full_like(x, eps_value), x_t, (1,), schedule=schedule)
    a_t, a_0 = float(base.alpha_bar[1]), float(base.alpha_bar[0])
    x0_pred = (0.5 - np.sqrt(1 - a_t) * eps_value) / np.sqrt(a_t)
    assert torch.allclose(out, torch.tensor(np.sqrt(a_0) * x0_pred + np.sqrt(1 - a_0) * eps_value).float())
    assert schedule.alpha_bar_at(-1) == pytest.approx(1 - 0.0015, abs=1e-7)
    with pytest.raises(ValueError, match="final_alpha_bar"):
        NoiseSchedule(base.betas, final_alpha_bar=0.0)
