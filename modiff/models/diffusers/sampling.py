"""Sampling a wrapped diffusers model with its own scheduler, and the scheduler's timesteps.

The toolkit's samplers (`modiff.sample_ddim`, ...) run on a `DiffusersDenoiser` unchanged; with the
scheduler's timesteps (`scheduler_timesteps`, or the spacing `DiffusersDenoiser.spacing` names) the
toolkit's DDIM takes the steps of diffusers' DDIMScheduler, with coefficients computed in float64
instead of float32 tensors (agreement to float rounding). `sample_scheduler` runs the pipeline's own
loop instead (any scheduler: PNDM, Euler, DPM-Solver++, ...), bit for bit as the diffusers pipeline
steps, with the toolkit's callback.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch

from modiff.diffusion.sampling import Callback, StepInfo

__all__ = ["sample_scheduler", "scheduler_timesteps"]


def _fresh(scheduler: Any, steps: int, device: torch.device) -> Any:
    """A copy of `scheduler` that consumes eps (the wrapper converts other predictions), set to `steps`."""
    scheduler = copy.deepcopy(scheduler)
    if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type="epsilon")
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def scheduler_timesteps(model: Any, steps: int) -> tuple[int, ...]:
    """The timesteps of diffusers' DDIMScheduler made from the model's scheduler config (as a pipeline
    switched to DDIM takes them), for the toolkit's DDIM.

    The toolkit's DDIM steps from each timestep to the next one; DDIMScheduler from t to t - T // S. The two
    agree for "leading" spacing; other spacings are refused with the reason.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    ts = tuple(int(t) for t in scheduler.timesteps)
    stride = scheduler.config.num_train_timesteps // steps
    if any(a - b != stride for a, b in zip(ts, ts[1:])) or ts[-1] - stride >= 0:
        raise ValueError(f"DDIMScheduler with timestep_spacing={scheduler.config.timestep_spacing!r} steps from t to "
                         f"t - {stride}, not to the next of its timesteps {ts[:4]}...; the toolkit's DDIM cannot "
                         f"follow it: use sample_scheduler, or 'leading' spacing")
    return ts


@torch.no_grad()
def sample_scheduler(model: Any, x_T: torch.Tensor, steps: int, *, scheduler: Any = None,
                     callback: Optional[Callback] = None, generator: Optional[torch.Generator] = None,
                     **step_kwargs: Any) -> torch.Tensor:
    """The diffusers pipeline loop: x = x_T * init_noise_sigma, then per timestep t of the scheduler
    eps = model(scale_model_input(x, t), t) and x = scheduler.step(eps, t, x).prev_sample.

    `scheduler` defaults to the model's own (copied, never changed). Stochastic schedulers draw from
    `generator`, one stream for the batch as in diffusers (not the per-seed streams of the toolkit's
    samplers). `step_kwargs` go to `scheduler.step` (eta=... for DDIMScheduler). The callback gets the
    scaled input as x_t and x0_pred from eps and alpha_bar_t.
    """
    scheduler = _fresh(scheduler if scheduler is not None else model.scheduler, steps, x_T.device)
    if generator is not None:
        step_kwargs["generator"] = generator
    ts = [int(t) for t in scheduler.timesteps]
    x = x_T.float() * scheduler.init_noise_sigma
    for index, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = model(x_in, t_batch).float()
        x_prev = scheduler.step(eps, t, x, return_dict=False, **step_kwargs)[0]
        if callback is not None:
            a_t = model.schedule.alpha_bar_at(int(t))
            x0_pred = (x_in - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            t_prev = ts[index + 1] if index + 1 < len(ts) else -1
            callback(StepInfo(index, int(t), t_prev, x_in, eps, x0_pred, x_prev))
        x = x_prev
    return x
