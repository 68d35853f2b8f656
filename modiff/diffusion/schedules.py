"""Noise schedules and timestep sequences.

Notation: beta_t the forward-process variances, alpha_bar_t = prod_{s<=t} (1 - beta_s), t in 0..T-1.
The sampling convention of the DDIM code is kept: a sequence of timesteps runs in descending order and
each step goes from t to t_prev, the next smaller timestep, with t_prev = -1 (alpha_bar = 1) after the last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

__all__ = [
    "NoiseSchedule",
    "Spacing",
    "linear_schedule",
    "sqrt_linear_schedule",
    "timesteps",
]

Spacing = Literal["uniform", "quad", "quad-unique", "ldm"]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """betas and alpha_bar as float32 tensors of shape (T,), on the CPU.

    `final_alpha_bar` is alpha_bar after the last sampling step (t_prev = -1). The DDIM code uses 1 (the
    sample lands on clean data); the CompVis DDIM sampler of the LDMs steps onto alpha_bar_0 instead, so
    a latent model built from a CompVis config carries that value and samples as published.
    """

    betas: torch.Tensor
    final_alpha_bar: float = 1.0

    def __post_init__(self) -> None:
        b = self.betas
        if b.ndim != 1 or len(b) < 2:
            raise ValueError(f"betas must be a 1-D tensor of length >= 2, got shape {tuple(b.shape)}")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must lie strictly between 0 and 1")
        if not 0 < self.final_alpha_bar <= 1:
            raise ValueError(f"final_alpha_bar must lie in (0, 1], got {self.final_alpha_bar}")

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alpha_bar(self) -> torch.Tensor:
        # float32 cumulative product, as the published DDIM code computes it.
        return torch.cumprod(1.0 - self.betas, dim=0)

    def alpha_bar_at(self, t: int) -> float:
        """alpha_bar_t as a Python float; t = -1 (past the last step) gives `final_alpha_bar`."""
        if t == -1:
            return self.final_alpha_bar
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"timestep {t} outside [-1, {self.num_timesteps - 1}]")
        return float(self.alpha_bar[t])

    def to_dict(self) -> dict[str, object]:
        return {"num_timesteps": self.num_timesteps, "beta_first": float(self.betas[0]), "beta_last": float(self.betas[-1]),
                "final_alpha_bar": self.final_alpha_bar}


def linear_schedule(beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000) -> NoiseSchedule:
    """Betas linear in [beta_start, beta_end], computed in float64 then stored as float32 (as published)."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return NoiseSchedule(torch.from_numpy(betas).float())


def sqrt_linear_schedule(linear_start: float = 0.0015, linear_end: float = 0.0195, num_timesteps: int = 1000) -> NoiseSchedule:
    """The LDM 'linear' schedule: betas linear in sqrt space, squared (float64 then float32)."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
    return NoiseSchedule(torch.from_numpy(betas).float())


def timesteps(steps: int, spacing: Spacing = "uniform", num_timesteps: int = 1000, offset: int = 0) -> tuple[int, ...]:
    """Timesteps in sampling (descending) order.

    - ``uniform``: range(0, T, T // S), as in the DDIM code.
    - ``ldm``: range(0, T, T // S) + 1, the CompVis LDM DDIM convention (``make_ddim_timesteps``): the
      last model evaluation is at t = 1. As with ``uniform``, an S for which T // S does not divide T
      gives extra steps; a sequence that reaches t = T is refused (CompVis fails on it too).
      ``offset`` adds to this +1.
    - ``quad``: int(linspace(0, sqrt(0.8 T), S)^2), exactly as published: it starts at 0.8 T, not T - 1,
      and may repeat timesteps (for S = 100 and T = 1000 it holds t = 0 four times and t = 2 twice). Repeats are real
      model evaluations, kept so that published numbers can be reproduced.
    - ``quad-unique``: the same sequence with repeats removed (fewer than S steps).
    """
    if spacing not in get_args(Spacing):
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {', '.join(get_args(Spacing))}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing in ("uniform", "ldm"):
        seq = list(range(0, num_timesteps, num_timesteps // steps))
        if spacing == "ldm":
            offset += 1
    else:
        seq = [int(s) for s in np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2]
        if spacing == "quad-unique":
            seq = sorted(set(seq))
    seq = [s + offset for s in seq]
    if seq[-1] >= num_timesteps:
        raise ValueError(f"spacing {spacing!r} with {steps} steps (offset {offset}) reaches timestep {seq[-1]}, "
                         f"past T - 1 = {num_timesteps - 1}; choose steps that divide T")
    return tuple(reversed(seq))
