"""Samplers against known answers: Gaussian data, whose exact eps predictor is affine in x_t.

Data x0 ~ N(MU, S^2), elementwise. With a = alpha_bar_t, x_t = sqrt(a) x0 + sqrt(1 - a) eps is
N(sqrt(a) MU, a S^2 + 1 - a), and E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) MU) / (a S^2 + 1 - a).
Every DDIM/DDPM step is then affine in x_t plus Gaussian noise, so the exact mean and variance of the
sampler's output follow from a scalar float64 recursion (`reference_moments`), independent of the tensor code.
The probability-flow ODE maps x_T to MU + S (x_T - sqrt(a_T) MU) / sqrt(a_T S^2 + 1 - a_T) (`exact_flow`).

S = 0.2 keeps the data inside [-1, 1], so DDPM's clipping of x0_pred to [-1, 1] plays no part. Such narrow
data makes the low-noise steps stiff: at 100 uniform steps DDIM (eta=0) gives 0.88 S^2 and DDPM 1.12 S^2.
Those are discretization errors (they vanish at 1000 steps and match the float64 recursion), so the tests
pin the samplers to the recursion at coarse step counts and to N(MU, S^2) at fine ones.
"""
from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch
from torch import nn

from modiff import SeedStreams, StepInfo, linear_schedule, sample_ddim, sample_ddpm, sample_dpm_solver, timesteps

MU, S = 0.3, 0.2
SHAPE = (1, 32, 32)  # elements are iid: B * 1024 scalar samples (few seeds: per-seed draws cost time)
B = 64
N = B * 1024
SCHEDULE = linear_schedule()


class GaussianEps(nn.Module):
    """The exact eps predictor E[eps | x_t] for data N(MU, S^2), computed in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.schedule = SCHEDULE
        self.alpha_bar = SCHEDULE.alpha_bar.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (torch.sqrt(1 - a) * (x.double() - torch.sqrt(a) * MU) / (a * S**2 + 1 - a)).float()


MODEL = GaussianEps()


def _a(t: int) -> float:
    return SCHEDULE.alpha_bar_at(t)


def reference_moments(ts: Sequence[int], sampler: str, eta: float = 0.0) -> tuple[float, float]:
    """Exact (mean, variance) of DDIM(eta) / DDPM output for x_T ~ N(0, 1), by a scalar float64 recursion."""
    mean, var = 0.0, 1.0
    for t, t_prev in zip(ts, list(ts[1:]) + [-1]):
        a, a_prev = _a(t), _a(t_prev)
        k = math.sqrt(1 - a) / (a * S**2 + 1 - a)  # eps = k x - k sqrt(a) MU
        eps_1, eps_0 = k, -k * math.sqrt(a) * MU
        x0_1, x0_0 = (1 - math.sqrt(1 - a) * eps_1) / math.sqrt(a), -math.sqrt(1 - a) * eps_0 / math.sqrt(a)
        if sampler == "ddim":  # Song et al. (12): sigma_t^2 = eta^2 (1 - a_prev)/(1 - a) (1 - a/a_prev)
            sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            direction = math.sqrt(1 - a_prev - sigma2)
            g_1, g_0 = math.sqrt(a_prev) * x0_1 + direction * eps_1, math.sqrt(a_prev) * x0_0 + direction * eps_0
        else:  # DDPM posterior mean (Ho et al. (7)) with the published variance beta = 1 - a / a_prev
            beta = 1 - a / a_prev
            c_x0, c_xt = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            g_1, g_0 = c_x0 * x0_1 + c_xt, c_x0 * x0_0
            sigma2 = beta if t != 0 else 0.0
        mean, var = g_1 * mean + g_0, g_1**2 * var + sigma2
    return mean, var


def exact_flow(x_T: torch.Tensor, t_start: int) -> torch.Tensor:
    """The probability-flow ODE solution from x_T at t_start to t = 0 (clean data), float64."""
    a = _a(t_start)
    return MU + S * (x_T.double() - math.sqrt(a) * MU) / math.sqrt(a * S**2 + 1 - a)


def dpm_solver_2m_reference(x_T: torch.Tensor, ts: Sequence[int]) -> torch.Tensor:
    """DPM-Solver++(2M) of Lu et al. (2022), Alg. 2, in float64 with lambda = log(alpha / sigma)."""
    x = x_T.double()
    lam = lambda a: math.inf if a == 1.0 else 0.5 * math.log(a / (1 - a))  # noqa: E731
    x0_prev, h_prev = None, None
    pairs = list(zip(ts, list(ts[1:]) + [-1]))
    for i, (t, t_prev) in enumerate(pairs):
        a, a_prev = _a(t), _a(t_prev)
        a_t = torch.tensor(a, dtype=torch.float64)
        eps = math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / (a_t * S**2 + 1 - a_t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        h = lam(a_prev) - lam(a)
        if x0_prev is None or i == len(pairs) - 1:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = math.sqrt(1 - a_prev) / math.sqrt(1 - a) * x - math.sqrt(a_prev) * (math.exp(-h) - 1) * d
        x0_prev, h_prev = x0, h
    return x


def _draw(sampler: str, steps: int, spacing: str = "uniform", eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_0) for B seeds; later noise continues each seed's stream, as modiff.pipelines.generate does."""
    rng = SeedStreams(range(B))
    x_T = rng.randn(SHAPE)
    ts = timesteps(steps, spacing)
    if sampler == "ddim":
        out = sample_ddim(MODEL, x_T, ts, eta=eta, rng=rng if eta > 0 else None)
    elif sampler == "ddpm":
        out = sample_ddpm(MODEL, x_T, ts, rng=rng)
    else:
        out = sample_dpm_solver(MODEL, x_T, ts)
    return x_T, out.double()


def _assert_moments(x: torch.Tensor, mean: float, var: float, var_rtol: float, mean_se: float = 5.0) -> None:
    """Sample mean within mean_se standard errors of `mean`, sample variance within var_rtol of `var`."""
    got_mean, got_var = x.mean().item(), x.var().item()
    assert abs(got_mean - mean) < mean_se * math.sqrt(var / N), f"mean {got_mean:.5f}, expected {mean:.5f}"
    assert abs(got_var / var - 1) < var_rtol, f"variance {got_var:.5f} = {got_var / var:.4f} x expected {var:.5f}"


# 5 standard errors of a variance estimate from N samples, relative: 5 sqrt(2 / N) = 2.8 %.
VAR_SE5 = 5 * math.sqrt(2 / N)


@pytest.mark.parametrize(
    "sampler, steps, eta",
    [("ddim", 100, 0.0), ("ddim", 100, 1.0), ("ddim", 20, 0.5), ("ddpm", 100, 1.0), ("ddpm", 20, 1.0)],
)
def test_output_moments_match_exact_recursion(sampler: str, steps: int, eta: float) -> None:
    """Sample mean/variance equal the exact float64 moments of the same discrete sampler (5 SE)."""
    mean, var = reference_moments(timesteps(steps), sampler, eta)
    x_T, out = _draw(sampler, steps, eta=eta)
    if sampler == "ddim" and eta == 0:  # deterministic: remove x_T's own sampling error exactly
        g = math.sqrt(var)
        mean, var = mean + g * x_T.double().mean().item(), var * x_T.double().var().item()
    _assert_moments(out, mean, var, VAR_SE5)


@pytest.mark.parametrize("sampler, eta, var_rtol", [("ddim", 0.0, 0.03), ("ddim", 1.0, 0.05), ("ddpm", 1.0, 0.03)])
def test_fine_sampling_reaches_data_distribution(sampler: str, eta: float, var_rtol: float) -> None:
    """With all 1000 steps every sampler gives N(MU, S^2) (exact-recursion bias: -1.5 %, -3.7 %, +0.9 %)."""
    _, out = _draw(sampler, 1000, eta=eta)
    _assert_moments(out, MU, S**2, var_rtol)


def test_dpm_solver_reaches_data_distribution_in_20_steps() -> None:
    """DPM-Solver++(2M), 20 quad-unique steps: output moments within 10 % of the exact flow's."""
    x_T, out = _draw("dpm-solver", 20, "quad-unique")
    target = exact_flow(x_T, timesteps(20, "quad-unique")[0])
    _assert_moments(out, target.mean().item(), target.var().item(), 0.10)
    _assert_moments(out, MU, S**2, 0.10, mean_se=10.0)


@pytest.mark.parametrize("spacing", ["uniform", "quad-unique"])
def test_dpm_solver_matches_float64_reference(spacing: str) -> None:
    """sample_dpm_solver equals an independent float64 DPM-Solver++(2M) within float32 rounding."""
    x_T = torch.linspace(-3, 3, 64).view(4, 1, 4, 4)
    ts = timesteps(20, spacing)
    torch.testing.assert_close(sample_dpm_solver(MODEL, x_T, ts).double(), dpm_solver_2m_reference(x_T, ts), atol=1e-4, rtol=1e-4)


def test_ddim_ode_maps_gaussian_to_gaussian() -> None:
    """Deterministic DDIM sends a grid of x_T along the exact probability-flow map (first-order error)."""
    x_T = torch.linspace(-3, 3, 64).view(4, 1, 4, 4)
    errors = {}
    for steps in (100, 1000):
        ts = timesteps(steps)
        errors[steps] = (sample_ddim(MODEL, x_T, ts).double() - exact_flow(x_T, ts[0])).abs().max().item()
    assert errors[1000] < 0.01, errors
    assert errors[100] < 0.05, errors
    assert 5 < errors[100] / errors[1000] < 20, f"not first order: {errors}"


def test_dpm_solver_is_second_order() -> None:
    """Doubling the steps divides DPM-Solver++(2M)'s error by > 3 and DDIM's by about 2."""
    x_T = torch.linspace(-3, 3, 64).view(4, 1, 4, 4)

    def error(sampler, steps: int) -> float:
        ts = timesteps(steps)
        return (sampler(MODEL, x_T, ts).double() - exact_flow(x_T, ts[0])).abs().max().item()

    assert error(sample_dpm_solver, 100) / error(sample_dpm_solver, 200) > 3
    assert 1.6 < error(sample_ddim, 100) / error(sample_ddim, 200) < 2.4


def test_repeated_timesteps_are_identity_steps() -> None:
    """The published 'quad' repeats (t=0 four times) are no-op steps: DDIM output equals 'quad-unique'."""
    x_T = torch.linspace(-3, 3, 64).view(4, 1, 4, 4)
    with_repeats = sample_ddim(MODEL, x_T, timesteps(100, "quad"))
    assert torch.isfinite(sample_dpm_solver(MODEL, x_T, timesteps(100, "quad"))).all()
    torch.testing.assert_close(with_repeats, sample_ddim(MODEL, x_T, timesteps(100, "quad-unique")), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm, sample_dpm_solver])
def test_callback_sees_every_step(sampler) -> None:
    """The callback gets StepInfo with index 0..S-1, (t, t_prev) pairs ending at -1, chained x_t/x_prev."""
    ts = timesteps(5)
    infos: list[StepInfo] = []
    rng = SeedStreams([0, 1])
    x_T = rng.randn(SHAPE)
    kwargs = {"rng": rng} if sampler is sample_ddpm else {}
    out = sampler(MODEL, x_T, ts, callback=infos.append, **kwargs)
    assert [i.index for i in infos] == list(range(5))
    assert [(i.t, i.t_prev) for i in infos] == list(zip(ts, list(ts[1:]) + [-1]))
    assert torch.equal(infos[0].x_t, x_T)
    for before, after in zip(infos, infos[1:]):
        assert torch.equal(before.x_prev, after.x_t)
    assert torch.equal(infos[-1].x_prev, out)
    assert all(i.eps.shape == i.x0_pred.shape == x_T.shape for i in infos)


def test_sampler_argument_errors() -> None:
    """Ascending timesteps, missing/mismatched rng, bad eta and a model without schedule are refused."""
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="descending"):
        sample_ddim(MODEL, x, [0, 10, 20])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        sample_ddim(MODEL, x, [1000, 10])
    with pytest.raises(ValueError, match="rng=SeedStreams"):
        sample_ddpm(MODEL, x, timesteps(5))
    with pytest.raises(ValueError, match="rng=SeedStreams"):
        sample_ddim(MODEL, x, timesteps(5), eta=0.5)
    with pytest.raises(ValueError, match="rng=SeedStreams"):  # even where no step draws (one step onto t = -1)
        sample_ddim(MODEL, x, [0], eta=0.5)
    with pytest.raises(ValueError, match="3 seeds"):
        sample_ddpm(MODEL, x, timesteps(5), rng=SeedStreams([0, 1, 2]))
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(MODEL, x, timesteps(5), eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        sample_ddpm(MODEL, x, timesteps(5), eta=0.5, rng=SeedStreams([0, 1]))
    with pytest.raises(ValueError, match="deterministic"):
        sample_dpm_solver(MODEL, x, timesteps(5), eta=0.5)
    with pytest.raises(TypeError, match="schedule"):
        sample_ddim(lambda x, t: x, x, timesteps(5))
    assert sample_ddim(lambda x, t: torch.zeros_like(x), x, timesteps(5), schedule=SCHEDULE).shape == x.shape


def test_ddpm_clips_x0_pred_and_ddim_does_not() -> None:
    """DDPM clips x0_pred to [-1, 1] as published (`ddpm_steps`); DDIM leaves it unclipped."""
    x_T = 3 * SeedStreams([0, 1]).randn(SHAPE)
    seen: dict[str, float] = {}
    for name, sampler, kwargs in (("ddpm", sample_ddpm, {"rng": SeedStreams([0, 1])}), ("ddim", sample_ddim, {})):
        peaks: list[float] = []
        sampler(lambda x, t: -x, x_T, timesteps(5), schedule=SCHEDULE, callback=lambda i: peaks.append(i.x0_pred.abs().max().item()), **kwargs)
        seen[name] = max(peaks)
    assert seen["ddpm"] <= 1.0 < seen["ddim"], seen


def test_ddpm_without_clipping_keeps_x0_pred_as_predicted() -> None:
    """clip_denoised=False (latent models): x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) as predicted, beyond
    [-1, 1] here (eps = -x_t at the first step, x_T of scale 3)."""
    x_T = 3 * SeedStreams([0, 1]).randn(SHAPE)
    steps: list = []
    sample_ddpm(lambda x, t: -x, x_T, timesteps(5), schedule=SCHEDULE, rng=SeedStreams([0, 1]), clip_denoised=False,
                callback=steps.append)
    a_t = SCHEDULE.alpha_bar_at(steps[0].t)
    expected = (x_T + math.sqrt(1 - a_t) * x_T) / math.sqrt(a_t)
    torch.testing.assert_close(steps[0].x0_pred, expected)
    assert steps[0].x0_pred.abs().max() > 1


def test_ddpm_last_step_adds_no_noise() -> None:
    """The step from t = 0 is the posterior mean only (published mask 1 - (t == 0)); earlier steps are noisy."""
    x = SeedStreams([0, 1]).randn(SHAPE)
    final = [sample_ddpm(MODEL, x, [0], rng=SeedStreams(seeds)) for seeds in ([2, 3], [4, 5])]
    assert torch.equal(final[0], final[1])
    noisy = [sample_ddpm(MODEL, x, [10, 0], rng=SeedStreams(seeds)) for seeds in ([2, 3], [4, 5])]
    assert not torch.equal(noisy[0], noisy[1])


@pytest.mark.parametrize("sampler, eta", [("ddpm", 1.0), ("ddim", 0.5)])
def test_noise_drawn_ahead_is_each_steps_next_draw(sampler: str, eta: float) -> None:
    """The stochastic samplers' noise, drawn a step ahead on a background thread, is bitwise the loop's own
    `rng.randn` at each noisy step: the published update written out here with per-step draws gives the same
    x_0, and the streams end exactly one draw per noisy step on (the last DDPM step and DDIM's onto t = -1 draw
    none)."""
    seeds, ts = [5, 9], timesteps(6)
    x_T = SeedStreams(seeds).randn(SHAPE)
    rng = SeedStreams(seeds)
    got = (sample_ddpm(MODEL, x_T, ts, rng=rng) if sampler == "ddpm"
           else sample_ddim(MODEL, x_T, ts, eta=eta, rng=rng))
    reference, x, noisy = SeedStreams(seeds), x_T.clone(), 0
    for t, t_prev in zip(ts, [*ts[1:], -1]):
        a_t, a_prev = SCHEDULE.alpha_bar_at(t), SCHEDULE.alpha_bar_at(t_prev)
        eps = MODEL(x, torch.full((len(seeds),), t)).float()
        if sampler == "ddpm":
            beta = 1 - a_t / a_prev
            x0 = (x * math.sqrt(1 / a_t) - math.sqrt(1 / a_t - 1) * eps).clamp(-1, 1)
            x_prev = (math.sqrt(a_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a_t)
            c1 = math.sqrt(beta) if t != 0 else 0.0
        else:
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            c1 = eta * math.sqrt(max((1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t), 0.0))
            x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - c1**2, 0.0)) * eps
        if c1 > 0:
            x_prev, noisy = x_prev + c1 * reference.randn(SHAPE), noisy + 1
        x = x_prev
    assert torch.equal(got, x) and noisy == len(ts) - 1
    assert torch.equal(rng.randn(SHAPE), reference.randn(SHAPE))
