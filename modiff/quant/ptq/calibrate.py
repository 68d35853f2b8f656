"""Calibration: the full Q-Diffusion recipe (and its MoDiff variant), and the plain observer path.

`calibrate(model, config, data)` returns a quantized copy of ``model`` for ``config``:

1. weights (if quantized): AdaRound with BRECQ block reconstruction on a weight-only, direct-mode copy
   (`calibrate_weights`; weights do not depend on the step, the mode or the activations, so every preset
   with the same weight quantization can share one result: ``calibrate(..., weights=...)``);
2. static activations (if any):
   - direct mode (Q-Diffusion): observers (min-max or MSE search) over the calibration inputs, then
     learned step sizes block by block;
   - modulated mode (Q-Diffusion + MoDiff): residual quantizers, layer by layer, on the residuals of the
     calibration pairs (see `modiff.quant.ptq.lsq`).
   Dynamic activations need no calibration.

`observe_activations` is the simple static path alone: run the quantized model with observing
quantizers (for a modulated model: a warm-up call on the previous input, then the current one, so the
observers see residuals) and freeze what they saw.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.api import quant_layers, quantize
from modiff.quant.ptq.data import CalibData
from modiff.quant.config import QuantConfig
from modiff.quant.ptq.lsq import ActCalibConfig, learn_residual_step_sizes
from modiff.quant.layers.direct import ActQuantizer
from modiff.quant.layers.trajectory import trajectory
from modiff.quant.ptq.progress import UnitProgress
from modiff.quant.ptq.reconstruct import learn_step_sizes, reconstruct_weights, reconstruction_units

__all__ = ["CalibrationConfig", "calibrate", "calibrate_weights", "weight_only_config", "observe_activations",
           "needs_data"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """The recipe: ``weights`` None rounds weights to nearest (no AdaRound); ``capture_batch`` is the
    batch of the no-grad passes that capture block inputs and targets."""

    weights: Optional[AdaRoundConfig] = field(default_factory=AdaRoundConfig)
    activations: ActCalibConfig = field(default_factory=ActCalibConfig)
    capture_batch: int = 256

    def __post_init__(self) -> None:
        if self.capture_batch < 1:
            raise ValueError(f"capture_batch must be >= 1, got {self.capture_batch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def needs_data(config: QuantConfig) -> bool:
    """Whether ``config`` has static activation quantizers (which need calibration data)."""
    return config.activation is not None and not config.activation.dynamic


def _static_quantizers(qmodel: nn.Module) -> list[ActQuantizer]:
    return [m for m in qmodel.modules() if isinstance(m, ActQuantizer) and not m.config.dynamic]


@torch.no_grad()
def observe_activations(qmodel: nn.Module, data: CalibData, batch_size: int = 256) -> nn.Module:
    """Fix the static activation qparams of ``qmodel`` (in place) from what its observers see; returns it."""
    quantizers = _static_quantizers(qmodel)
    if not quantizers:
        raise ValueError("the model has no static activation quantizers; nothing to calibrate")
    config = getattr(qmodel, "quant_config", None)
    stateful = config is not None and config.stateful
    for q in quantizers:
        q.observing = True
    try:
        for i in range(0, len(data), batch_size):
            x, t = data.x[i : i + batch_size].float(), data.t[i : i + batch_size]
            if not stateful:
                qmodel(x, t)
                continue
            with trajectory(qmodel, reset="per_trajectory"):  # warm-up on the previous input, then the residual
                for _ in range(config.warmup_steps):
                    qmodel(data.x_before[i : i + batch_size].float(), data.t_before[i : i + batch_size])
                qmodel(x, t)
    finally:
        for q in quantizers:
            q.observing = False
    for q in quantizers:
        q.freeze()
    log.info("observed %d activation quantizers on %d inputs", len(quantizers), len(data))
    return qmodel


def weight_only_config(config: QuantConfig) -> QuantConfig:
    """The weight-only, direct-mode config whose AdaRound weights ``config`` uses: presets that differ only
    in activations or mode (qdiff-w4a8, qdiff-w4a4-modiff, w4a4-adaround, ...) map to the same one and can
    share them. Its weights round to nearest: AdaRound starts there and replaces the codes. It is simulated: the
    backend computes with the codes and does not change them, so the real presets share them too."""
    return replace(config, mode="direct", activation=None, quantize_attention=False, compensation=True,
                   warmup_steps=1, cache_interval=0, reset="per_trajectory",
                   backend="simulated").with_weight_codes("nearest")


def calibrate_weights(model: nn.Module, config: QuantConfig, data: CalibData,
                      recipe: CalibrationConfig = CalibrationConfig(), progress: bool = True,
                      checkpoints: Optional[str | Path | UnitProgress] = None) -> tuple[nn.Module, dict[str, Any]]:
    """The weight-only quantized copy of ``model`` for ``config`` (on data's device): AdaRound with block
    reconstruction when the recipe has it, round to nearest otherwise. Returns it and a report.
    ``checkpoints``: a folder that keeps every finished unit, so an interrupted run resumes there."""
    started = time.time()
    fp_model = copy.deepcopy(model).to(data.device).eval()
    wq_model = quantize(fp_model, weight_only_config(config))
    report: dict[str, Any] = {}
    if config.weight is not None and recipe.weights is not None:
        units = reconstruction_units(wq_model, data)
        resume = _progress(checkpoints, model, weight_only_config(config), recipe, data, None)
        report["weights"] = reconstruct_weights(wq_model, fp_model, data, units, recipe.weights,
                                                recipe.capture_batch, progress, resume)
        report["adaround_vs_nearest"] = rounding_summary(report["weights"])
    report["seconds_weights"] = round(time.time() - started, 2)
    return wq_model, report


def rounding_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How AdaRound's rounding compares with round-to-nearest on the same grids, over the units of
    `reconstruct_weights`: the median ratio of their reconstruction losses, and how many units it lowered.
    (A unit's inputs come from the already AdaRounded units before it, for both roundings.)"""
    return _loss_summary(records, "loss_nearest", "loss_adaround")


def step_size_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How the learned step sizes compare with their observer start, over the units that learned them: the median
    ratio of the losses over all calibration inputs, and how many units it lowered; empty when none learned."""
    learned = [r for r in records if "loss_start" in r]
    return _loss_summary(learned, "loss_start", "loss_learned") if learned else {}


def _loss_summary(records: list[dict[str, Any]], before: str, after: str) -> dict[str, Any]:
    ratios = [r[after] / r[before] for r in records if r[before] > 0]
    return {"units": len(records), "units_lowered": sum(r[after] < r[before] for r in records),
            "median_loss_ratio": float(np.median(ratios)) if ratios else float("nan")}


def _progress(checkpoints: Optional[str | Path | UnitProgress], model: nn.Module, config: QuantConfig,
              recipe: CalibrationConfig, data: CalibData, weights: Optional[nn.Module]) -> Optional[UnitProgress]:
    """The finished-unit store of ``checkpoints``, keyed by everything that decides the result."""
    if checkpoints is None or isinstance(checkpoints, UnitProgress):
        return checkpoints
    digest = None
    if weights is not None:  # the reused weights themselves, not only their config
        hasher = hashlib.sha256()
        for name, layer in sorted(quant_layers(weights).items()):
            if layer.config.weight is not None:
                hasher.update(name.encode() + layer.weight_codes().cpu().numpy().tobytes())
        digest = hasher.hexdigest()
    return UnitProgress(Path(checkpoints), {
        "model": getattr(model, "name", type(model).__name__), "quant_config": config.to_dict(),
        "recipe": recipe.to_dict(), "data": asdict(data.config), "samples": len(data), "weights": digest})


def calibrate(model: nn.Module, config: QuantConfig, data: CalibData,
              recipe: CalibrationConfig = CalibrationConfig(), progress: bool = True,
              weights: Optional[nn.Module] = None,
              checkpoints: Optional[str | Path] = None) -> tuple[nn.Module, dict[str, Any]]:
    """A quantized copy of ``model`` for ``config``, calibrated on ``data`` (on data's device).

    ``weights``: a model whose weights are quantized as ``config`` quantizes them, from `calibrate_weights`
    or any calibrated preset (one AdaRound serves every preset with the same weight quantization); when
    None, AdaRound runs here.
    Returns the model and a report (per-unit losses and times, phase durations). ``model`` is not changed.
    ``checkpoints``: a folder that keeps every finished unit (AdaRound, step sizes), so that a run
    interrupted (Ctrl-C, a lost machine) and started again with the same arguments resumes there and
    ends bit for bit as an uninterrupted one (`modiff.quant.ptq.progress`).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if config.mode not in ("direct", "modulated"):
        raise ValueError(f"calibration supports modes 'direct' and 'modulated', got {config.mode!r}")
    started = time.time()
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "quant_config": config.to_dict()}
    resume = _progress(checkpoints, model, config, recipe, data, weights)
    if weights is None:
        weights, weight_report = calibrate_weights(model, config, data, recipe, progress, resume)
        report.update(weight_report)
    elif not _same_weights(weights, config):
        raise ValueError("weights were calibrated for another weight quantization: pass a model calibrated "
                         "with the same weight bits and layer selection (calibrate_weights(model, config, ...))")
    else:
        report["weights_reused"] = True
    fp_model = copy.deepcopy(model).to(data.device).eval()
    weight_only = _with_weights_of(quantize(fp_model, weight_only_config(config)), weights)
    units = reconstruction_units(weight_only, data)
    report["units"] = len(units)
    qmodel = _with_weights_of(quantize(fp_model, config.with_weight_codes("nearest")), weight_only)
    qmodel.quant_config = config
    phase = time.time()
    if needs_data(config):
        report["activations"] = _calibrate_activations(qmodel, fp_model, data, units, recipe, progress, resume)
        report["learned_vs_start"] = step_size_summary(report["activations"])
    report["seconds_activations"] = round(time.time() - phase, 2)
    report["seconds"] = round(time.time() - started, 2)
    return qmodel, report


def _same_weights(qmodel: nn.Module, config: QuantConfig) -> bool:
    own = getattr(qmodel, "quant_config", None)
    return isinstance(own, QuantConfig) and weight_only_config(own) == weight_only_config(config)


def _with_weights_of(qmodel: nn.Module, source: nn.Module) -> nn.Module:
    """``qmodel`` with the weight codes and grids of ``source`` (same layers, same weight quantization)."""
    if qmodel.quant_config.weight is None:
        return qmodel
    sources = quant_layers(source)
    for name, layer in quant_layers(qmodel).items():
        src = sources[name]
        layer.set_weight_codes(src.weight_codes(), src.weight_scale, src.weight_zero_point)
    return qmodel


def _calibrate_activations(qmodel: nn.Module, fp_model: nn.Module, data: CalibData, units: list,
                           recipe: CalibrationConfig, progress: bool,
                           resume: Optional[UnitProgress]) -> list[dict[str, Any]]:
    acts = recipe.activations
    if qmodel.quant_config.stateful:
        return learn_residual_step_sizes(qmodel, fp_model, data, units, acts, recipe.capture_batch, progress, resume)
    observe_activations(qmodel, data, recipe.capture_batch)
    if not acts.learn:
        return []
    return learn_step_sizes(qmodel, fp_model, data, units, acts, recipe.capture_batch, progress, resume)
