"""Time-step-aware calibration data (Q-Diffusion): model inputs (x_t, t) from full-precision trajectories.

One DDIM pass over ``samples_per_step`` seeds keeps, at ``calib_steps`` sampling-step indices spread
evenly over the trajectory, the model input x_t and the input of the step before it (one sampling step
earlier, at the larger timestep t_before). The pairs give MoDiff's residuals a_t - a_{t+1} at every layer.
The published setting is 20 of 100 steps with 256 samples each (5,120 inputs).

Notation (sampling order, t decreasing): step index i runs the model on x_t at t = ts[i]; the step
before it, index i - 1, ran on x_before at t_before = ts[i - 1] > t. Indices start at 1, so every
chosen input has its predecessor. (``before`` and not ``prev``: the samplers' ``t_prev`` is the next,
smaller timestep.)

On disk: ``calib_data.safetensors`` (x, t, x_before, t_before, index) and ``manifest.json`` (this
config, the timesteps, the model, the environment), written last so a folder with a manifest is complete.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, get_args

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modiff.diffusion.sampling import StepInfo, sample_ddim
from modiff.diffusion.schedules import Spacing, timesteps
from modiff.utils.progress import progress_bar
from modiff.utils.rng import SeedStreams
from modiff.utils.runs import atomic_path, ensure_writable_dir, environment, write_json

__all__ = ["CalibDataConfig", "CalibData", "StorageDtype", "chosen_indices", "collect_calib_data",
           "save_calib_data", "load_calib_data", "refuse_existing"]

log = logging.getLogger(__name__)

StorageDtype = Literal["float16", "bfloat16", "float32"]
TENSORS_FILE = "calib_data.safetensors"


@dataclass(frozen=True)
class CalibDataConfig:
    """Which inputs to keep: ``calib_steps`` of the ``steps`` DDIM steps, ``samples_per_step`` seeds each.

    Seeds are ``first_seed .. first_seed + samples_per_step - 1``; ``batch_size`` only splits the pass.
    ``dtype`` is the storage precision (float16 keeps about 3 significant digits of inputs in [-4, 4]).
    """

    steps: int = 100
    spacing: Spacing = "uniform"
    eta: float = 0.0
    calib_steps: int = 20
    samples_per_step: int = 256
    first_seed: int = 0
    batch_size: int = 256
    dtype: StorageDtype = "float16"

    def __post_init__(self) -> None:
        if self.spacing not in get_args(Spacing):
            raise ValueError(f"spacing must be one of {get_args(Spacing)}, got {self.spacing!r}")
        if self.dtype not in get_args(StorageDtype):
            raise ValueError(f"dtype must be one of {get_args(StorageDtype)}, got {self.dtype!r}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (every calibration input needs the step before it), got {self.steps}")
        if not 1 <= self.calib_steps <= self.steps - 1:
            raise ValueError(f"calib_steps must be in [1, steps - 1 = {self.steps - 1}] (step 0 has no step "
                             f"before it), got {self.calib_steps}")
        for name in ("samples_per_step", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.first_seed < 0 or self.eta < 0:
            raise ValueError(f"first_seed and eta must be >= 0, got {self.first_seed} and {self.eta}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def chosen_indices(steps: int, calib_steps: int) -> list[int]:
    """Sampling-step indices round(linspace(1, steps - 1, calib_steps)): evenly spread, all distinct, each with a
    predecessor (the published `generate()` takes 0, T/n, 2T/n, ..., whose index 0 pairs with itself: a zero
    residual).

    Consecutive points are (steps - 2) / (calib_steps - 1) >= 1 apart, so rounding keeps them distinct.
    """
    return [int(i) for i in np.linspace(1, steps - 1, calib_steps).round()]


@dataclass
class CalibData:
    """Calibration inputs, step-major: rows k*S .. (k+1)*S - 1 hold chosen step k (S samples per step).

    x, x_before: (N, C, H, W) in the storage dtype; t, t_before, index: (N,) int64. All on one device.
    """

    x: torch.Tensor
    t: torch.Tensor
    x_before: torch.Tensor
    t_before: torch.Tensor
    index: torch.Tensor
    config: CalibDataConfig

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> "CalibData":
        moved = {k: getattr(self, k).to(device) for k in ("x", "t", "x_before", "t_before", "index")}
        return CalibData(**moved, config=self.config)

    def subset(self, samples_per_step: int) -> "CalibData":
        """The first ``samples_per_step`` samples of every step (the MoDiff README's min-max uses 32)."""
        per_step = self.config.samples_per_step
        if not 1 <= samples_per_step <= per_step:
            raise ValueError(f"samples_per_step must be in [1, {per_step}], got {samples_per_step}")
        rows = torch.arange(len(self), device=self.device).remainder(per_step) < samples_per_step
        picked = {k: getattr(self, k)[rows] for k in ("x", "t", "x_before", "t_before", "index")}
        return CalibData(**picked, config=replace(self.config, samples_per_step=samples_per_step))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "t": self.t, "x_before": self.x_before, "t_before": self.t_before, "index": self.index}


@torch.no_grad()
def collect_calib_data(model: nn.Module, config: CalibDataConfig = CalibDataConfig(),
                       device: torch.device | str = "cpu", progress: bool = False) -> CalibData:
    """Run full-precision DDIM once over the seeds and keep the chosen steps' inputs and their predecessors.

    The kept tensors stay on ``device`` in the storage dtype; the model must already be on ``device``.
    """
    ts = timesteps(config.steps, config.spacing, model.schedule.num_timesteps)
    if not config.calib_steps <= len(ts) - 1:
        raise ValueError(f"the {config.spacing!r} sequence has {len(ts)} distinct steps; calib_steps must be at most "
                         f"{len(ts) - 1}, got {config.calib_steps}")
    wanted = chosen_indices(len(ts), config.calib_steps)  # len(ts) may differ from steps (uniform, quad-unique)
    keep = set(wanted) | {i - 1 for i in wanted}
    stored: dict[int, list[torch.Tensor]] = {i: [] for i in keep}

    def grab(info: StepInfo) -> None:
        if info.index in keep:
            stored[info.index].append(info.x_t.to(config.torch_dtype, copy=True))

    seeds = list(range(config.first_seed, config.first_seed + config.samples_per_step))
    batches = range(0, len(seeds), config.batch_size)
    for start in progress_bar(batches, "calibration data", progress, unit="batch"):
        rng = SeedStreams(seeds[start : start + config.batch_size])
        x_T = rng.randn(model.sample_shape, device=device)
        sample_ddim(model, x_T, ts, eta=config.eta, rng=rng if config.eta > 0 else None, callback=grab)
    n = config.samples_per_step

    def column(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).repeat_interleave(n).to(device)

    return CalibData(
        x=torch.cat([torch.cat(stored[i]) for i in wanted]),
        t=column([ts[i] for i in wanted]),
        x_before=torch.cat([torch.cat(stored[i - 1]) for i in wanted]),
        t_before=column([ts[i - 1] for i in wanted]),
        index=column(wanted),
        config=config,
    )


def refuse_existing(out: str | Path) -> None:
    """ValueError if ``out`` already holds a calibration dataset (checked before any sampling)."""
    if (Path(out) / "manifest.json").exists():
        raise ValueError(f"{out} already holds a calibration dataset; choose a new folder (another --out)")


def save_calib_data(data: CalibData, out: str | Path, metadata: Optional[Mapping[str, Any]] = None,
                    seconds: Optional[float] = None) -> Path:
    """Write the tensors, then the manifest (its presence marks a complete dataset); returns the folder."""
    refuse_existing(out)
    folder = ensure_writable_dir(Path(out))
    with atomic_path(folder / TENSORS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in data.tensors().items()}, str(tmp))
    manifest = {
        "kind": "calibration-data",
        "config": asdict(data.config),
        "samples": len(data),
        "timesteps": sorted(set(int(t) for t in data.t.tolist()), reverse=True),
        "metadata": dict(metadata or {}),
        "environment": environment(data.device),
        "seconds": None if seconds is None else round(seconds, 2),
    }
    write_json(manifest, folder / "manifest.json")
    return folder


def load_calib_data(folder: str | Path, device: torch.device | str = "cpu") -> CalibData:
    """Read a dataset written by `save_calib_data` (or `modiff calibrate-data`) onto ``device``."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} holds no calibration dataset (no manifest.json); make one with "
                                f"`modiff calibrate-data --model M --out {folder}`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind") != "calibration-data":
        raise ValueError(f"{manifest_path} describes a {manifest.get('kind')!r}, not calibration data")
    tensors = load_file(str(folder / TENSORS_FILE), device=str(torch.device(device)))
    return CalibData(**tensors, config=CalibDataConfig(**manifest["config"]))


def collect_and_save(model: nn.Module, config: CalibDataConfig, out: str | Path, device: torch.device,
                     metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """`collect_calib_data` then `save_calib_data`, with the duration in the manifest (the CLI's path)."""
    refuse_existing(out)
    ensure_writable_dir(Path(out))
    started = time.time()
    data = collect_calib_data(model.to(device).eval(), config, device, progress=True)
    log.info("collected %d calibration inputs at %d steps", len(data), config.calib_steps)
    return save_calib_data(data, out, metadata, seconds=time.time() - started)
