"""Samplers as pure loops with one signature and a per-step callback.

    sample_x(model, x_T, timesteps, *, eta, rng, callback, schedule) -> x_0

`model(x_t, t)` predicts eps; `timesteps` run in descending order (see `schedules.timesteps`), each step
going from t to t_prev (the next entry, -1 after the last). Notation, with a = alpha_bar:

    x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    DDIM:   x_prev = sqrt(a_prev) x0_pred + c1 z + c2 eps,
            c1 = eta sqrt((1 - a_t / a_prev)(1 - a_prev) / (1 - a_t)),  c2 = sqrt(1 - a_prev - c1^2)
    DDPM:   the published `ddpm_steps`: x0_pred clipped to [-1, 1] (pixel models only), variance
            beta = 1 - a_t / a_prev
    DPM-Solver++(2M): data prediction, multistep, first order at the first and last step.

Coefficients are Python floats computed up front, so the loop never waits on the device.
Noise for eta > 0 and DDPM comes from `rng` (one stream per seed, see `modiff.utils.rng`), each step's drawn on
a background thread while the step before runs (`SeedStreams.ahead`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

from modiff.diffusion.schedules import NoiseSchedule
from modiff.utils.rng import SeedStreams

__all__ = ["StepInfo", "sample_ddim", "sample_ddpm", "sample_dpm_solver", "SAMPLERS"]


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each step; tensors are (B, C, H, W) on the model's device."""

    index: int
    t: int
    t_prev: int
    x_t: torch.Tensor
    eps: torch.Tensor
    x0_pred: torch.Tensor
    x_prev: torch.Tensor


Callback = Callable[[StepInfo], None]


class EpsModel(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


def _resolve_schedule(model: object, schedule: Optional[NoiseSchedule]) -> NoiseSchedule:
    if schedule is not None:
        return schedule
    found = getattr(model, "schedule", None)
    if not isinstance(found, NoiseSchedule):
        raise TypeError(
            f"{type(model).__name__} has no `schedule`; pass schedule=... (a NoiseSchedule) to the sampler"
        )
    return found


def _step_pairs(seq: Sequence[int], schedule: NoiseSchedule) -> list[tuple[int, int]]:
    seq = [int(t) for t in seq]
    if not seq:
        raise ValueError("timesteps is empty")
    if any(b > a for a, b in zip(seq, seq[1:])):
        raise ValueError("timesteps must be in descending (sampling) order; use modiff.timesteps(...)")
    if seq[0] >= schedule.num_timesteps or seq[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {seq[0]}..{seq[-1]}")
    return list(zip(seq, seq[1:] + [-1]))


def _eps(model: EpsModel, x: torch.Tensor, t: int) -> torch.Tensor:
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return model(x, t_batch).float()


def _require_rng(rng: Optional[SeedStreams], x: torch.Tensor, who: str) -> SeedStreams:
    if rng is None:
        raise ValueError(f"{who} draws noise at every step: pass rng=SeedStreams(seeds)")
    if len(rng) != x.shape[0]:
        raise ValueError(f"rng has {len(rng)} seeds but x_T holds {x.shape[0]} samples")
    return rng


@torch.no_grad()
def sample_ddim(
    model: EpsModel,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    rng: Optional[SeedStreams] = None,
    callback: Optional[Callback] = None,
    schedule: Optional[NoiseSchedule] = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021), generalized steps with stochasticity eta (0: deterministic)."""
    schedule = _resolve_schedule(model, schedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    steps = [(t, t_prev, *_ddim_coefficients(schedule, t, t_prev, eta)) for t, t_prev in _step_pairs(timesteps, schedule)]
    if eta > 0:
        rng = _require_rng(rng, x_T, "DDIM with eta > 0")
    draws = sum(c1 > 0 for *_, c1, _ in steps)
    x = x_T.float()
    with _noise_ahead(rng, x, draws) as noise:
        for index, (t, t_prev, c1, c2) in enumerate(steps):
            a_t, a_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
            eps = _eps(model, x, t)
            x0_pred = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x_prev = math.sqrt(a_prev) * x0_pred + c2 * eps
            if c1 > 0:
                x_prev = x_prev + c1 * next(noise)
            if callback is not None:
                callback(StepInfo(index, t, t_prev, x, eps, x0_pred, x_prev))
            x = x_prev
    return x


def _ddim_coefficients(schedule: NoiseSchedule, t: int, t_prev: int, eta: float) -> tuple[float, float]:
    a_t, a_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
    c1 = eta * math.sqrt(max((1 - a_t / a_prev) * (1 - a_prev) / (1 - a_t), 0.0))
    return c1, math.sqrt(max(1 - a_prev - c1**2, 0.0))


def _noise_ahead(rng: Optional[SeedStreams], x: torch.Tensor, draws: int) -> contextlib.AbstractContextManager:
    """The loop's ``draws`` draws of per-seed noise shaped like ``x``, each drawn while the step before runs."""
    return rng.ahead(x.shape[1:], draws, x.device) if draws else contextlib.nullcontext(iter(()))


@torch.no_grad()
def sample_ddpm(
    model: EpsModel,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    *,
    eta: float = 1.0,
    rng: Optional[SeedStreams] = None,
    callback: Optional[Callback] = None,
    schedule: Optional[NoiseSchedule] = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Ancestral DDPM as published (`ddpm_steps`): clipped x0_pred, variance beta_t = 1 - a_t / a_prev.

    `eta` is accepted for a uniform signature and must be 1. ``clip_denoised=False`` leaves x0_pred as
    predicted: for latents, which are not confined to [-1, 1] (CompVis' LatentDiffusion hardcodes it; on
    `fmnist-ldm` the clamp cut latents whose 99th percentile |z| is 2.4 and broke the samples; README.md).
    Noise is added at every step with t != 0, as in `ddpm_steps`: on a latent schedule whose last step goes
    from t = 1 onto alpha_bar_0 (``ldm`` spacing) that step adds noise too, so the sample sits at alpha_bar_0's
    noise level, where the DDIM sampler's last step also lands (CompVis' 1,000-step DDPM ends at t = 0, noiseless).
    """
    if eta != 1.0:
        raise ValueError(f"DDPM is ancestral sampling (eta = 1); got eta={eta}. Use sample_ddim for other eta")
    schedule = _resolve_schedule(model, schedule)
    rng = _require_rng(rng, x_T, "DDPM")
    pairs = _step_pairs(timesteps, schedule)
    x = x_T.float()
    with _noise_ahead(rng, x, sum(t != 0 for t, _ in pairs)) as noise:
        for index, (t, t_prev) in enumerate(pairs):
            a_t, a_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
            beta = 1 - a_t / a_prev
            eps = _eps(model, x, t)
            x0_pred = x * math.sqrt(1 / a_t) - math.sqrt(1 / a_t - 1) * eps
            if clip_denoised:
                x0_pred = x0_pred.clamp(-1, 1)
            mean = (math.sqrt(a_prev) * beta * x0_pred + math.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a_t)
            x_prev = mean
            if t != 0:
                x_prev = mean + math.sqrt(beta) * next(noise)
            if callback is not None:
                callback(StepInfo(index, t, t_prev, x, eps, x0_pred, x_prev))
            x = x_prev
    return x


@torch.no_grad()
def sample_dpm_solver(
    model: EpsModel,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    rng: Optional[SeedStreams] = None,
    callback: Optional[Callback] = None,
    schedule: Optional[NoiseSchedule] = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second order in data prediction.

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma) and h = lambda_prev - lambda_t:
        x_prev = (sigma_prev / sigma_t) x_t + alpha_prev (1 - e^{-h}) D,
        D = x0_pred (first order) or (1 + 1/(2r)) x0_pred - 1/(2r) x0_pred_last, r = h_last / h.
    The first step and the last (onto t = -1, sigma = 0) are first order. Deterministic: eta must be 0.
    """
    if eta != 0.0:
        raise ValueError(f"DPM-Solver++(2M) is deterministic; got eta={eta}")
    schedule = _resolve_schedule(model, schedule)
    pairs = _step_pairs(timesteps, schedule)
    x = x_T.float()
    x0_last: Optional[torch.Tensor] = None
    h_last = 0.0
    for index, (t, t_prev) in enumerate(pairs):
        a_t, a_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
        alpha_prev, sigma_prev = math.sqrt(a_prev), math.sqrt(1 - a_prev)
        eps = _eps(model, x, t)
        x0_pred = (x - sigma_t * eps) / alpha_t
        # 1 - e^{-h} = 1 - (sigma_prev alpha_t) / (alpha_prev sigma_t): finite also when sigma_prev = 0.
        phi = 1 - (sigma_prev * alpha_t) / (alpha_prev * sigma_t)
        last_step = index == len(pairs) - 1
        h = math.log(alpha_prev / sigma_prev) - math.log(alpha_t / sigma_t) if sigma_prev > 0 else math.inf
        if x0_last is None or last_step or h == 0 or h_last == 0:
            data = x0_pred
        else:
            r = h_last / h
            data = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_last
        x_prev = (sigma_prev / sigma_t) * x + alpha_prev * phi * data
        if callback is not None:
            callback(StepInfo(index, t, t_prev, x, eps, x0_pred, x_prev))
        x0_last, h_last, x = x0_pred, h, x_prev
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpm-solver": sample_dpm_solver,
}
