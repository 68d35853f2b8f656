"""Static activation qparams from full-precision trajectories (the simple min-max/observer path).

Calibration inputs are the model inputs (x_t, t) at `calib_steps` steps spread evenly over full-precision
DDIM trajectories, together with the previous step's input (x_{t+1}, t+1), so that a modulated model's
observers see real residuals a_t - a_{t+1}. The quantized model then runs on those inputs with every
activation quantizer observing, and the observations become fixed qparams.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from modiff.diffusion.sampling import StepInfo, sample_ddim
from modiff.diffusion.schedules import Spacing, timesteps
from modiff.quant.modules import ActQuantizer
from modiff.quant.modulated import trajectory
from modiff.rng import noise

__all__ = ["CalibrationConfig", "CalibrationInputs", "collect_calibration_inputs", "calibrate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    calib_steps: int = 20
    steps: int = 100
    spacing: Spacing = "uniform"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.calib_steps <= self.steps:
            raise ValueError(f"calib_steps must be in [1, steps={self.steps}], got {self.calib_steps}")


@dataclass
class CalibrationInputs:
    """Per chosen step: inputs x (N, C, H, W) at t, and the previous step's inputs at t_prev_input."""

    x: list[torch.Tensor]
    t: list[int]
    x_before: list[torch.Tensor]
    t_before: list[int]


def _chosen_indices(config: CalibrationConfig) -> list[int]:
    # Index 0 has no previous step; choose among 1..S-1 so every input has its predecessor.
    return sorted(set(int(i) for i in np.linspace(1, config.steps - 1, config.calib_steps).round()))


@torch.no_grad()
def collect_calibration_inputs(model: nn.Module, seeds: Sequence[int], config: CalibrationConfig,
                               device: torch.device) -> CalibrationInputs:
    """One full-precision pass per batch of seeds; keeps inputs at the chosen steps and their predecessors."""
    ts = timesteps(config.steps, config.spacing, model.schedule.num_timesteps)
    wanted = set(_chosen_indices(config))
    keep = wanted | {i - 1 for i in wanted}
    stored: dict[int, list[torch.Tensor]] = {i: [] for i in keep}

    def grab(info: StepInfo) -> None:
        if info.index in keep:
            stored[info.index].append(info.x_t.to("cpu", torch.float16))

    seeds = list(seeds)
    for i in range(0, len(seeds), config.batch_size):
        batch = seeds[i : i + config.batch_size]
        sample_ddim(model, noise(batch, model.sample_shape, device), ts, callback=grab)
    order = sorted(wanted)
    return CalibrationInputs(
        x=[torch.cat(stored[i]) for i in order], t=[ts[i] for i in order],
        x_before=[torch.cat(stored[i - 1]) for i in order], t_before=[ts[i - 1] for i in order],
    )


def _quantizers(qmodel: nn.Module) -> list[ActQuantizer]:
    return [m for m in qmodel.modules() if isinstance(m, ActQuantizer) and not m.config.dynamic]


@torch.no_grad()
def calibrate(qmodel: nn.Module, inputs: CalibrationInputs, batch_size: int = 64) -> nn.Module:
    """Fix the static activation qparams of `qmodel` (in place) from calibration inputs; returns it."""
    quantizers = _quantizers(qmodel)
    if not quantizers:
        raise ValueError("the model has no static activation quantizers; nothing to calibrate")
    device = next(qmodel.parameters()).device
    config = getattr(qmodel, "quant_config", None)
    stateful = config is not None and config.stateful
    for q in quantizers:
        q.observing = True
    try:
        for x, t, x_before, t_before in zip(inputs.x, inputs.t, inputs.x_before, inputs.t_before):
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(device, torch.float32)
                tb = torch.full((len(xb),), t, device=device, dtype=torch.long)
                if stateful:  # warm-up calls set a_hat to the previous input; the next call's residual is observed
                    prev = x_before[i : i + batch_size].to(device, torch.float32)
                    t_prev = torch.full((len(prev),), t_before, device=device, dtype=torch.long)
                    with trajectory(qmodel, reset="per_trajectory"):
                        for _ in range(config.warmup_steps):
                            qmodel(prev, t_prev)
                        qmodel(xb, tb)
                else:
                    qmodel(xb, tb)
    finally:
        for q in quantizers:
            q.observing = False
    for q in quantizers:
        q.freeze()
    log.info("calibrated %d activation quantizers on %d steps", len(quantizers), len(inputs.t))
    return qmodel
