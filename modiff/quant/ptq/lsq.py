"""Static activation scales: settings, and MoDiff's residual calibration (Q-Diffusion + MoDiff).

Direct quantization (Q-Diffusion) starts the scales from the observers (min-max or MSE search) and
refines them block by block with learned step sizes (`reconstruct.learn_step_sizes`).

For a modulated layer the quantizer sees residuals r_t = a_t - a_{t+1} (one sampling step apart), not
activations. Each layer is calibrated on its own, as in the published MoDiff code, from the
full-precision inputs a_t and a_before = a_{t+1} of the calibration pairs:

- start: the observer of each of the layer's quantizers (each half of a split layer) on its r (min-max:
  asymmetric s = (max - min) / (2^b - 1) with the zero point recomputed, z = round(-min / s); symmetric
  s = absmax / (2^(b-1) - 1)). Not the published start, by choice: `layer_reconstruction_modiff` takes one
  scalar delta = (max r - min r) / (n_levels - 1) over all the layer's residuals with its quantizer's n_levels,
  2^b when asymmetric (so 2^b - 1 steps, as here) but 2^(b-1) - 1 when symmetric (``--a_sym``, the CIFAR-10
  commands), so 2^(b-1) - 2 steps: range / 6 at 4 bits, about 2.3x absmax / 7 on a symmetric range, range / 2
  at 3 bits, a division by zero at 2; it keeps the stale zero point and copies the delta into both halves of
  a split layer. With ``--cali_min_max`` (the MoDiff README's recommendation) that start is its final scale;
- learned step sizes: the layer runs on the previous input (a warm-up step, full-precision activations:
  o_hat = A_q(a_before) + b) and then on the current one (o = o_hat + A_q(Q(r))); the loss is
  lp_loss(o, A(a_t) + b). The bias cancels, so with base = A_q(a_before) - A(a_t), cached per sample,
  the loss is lp_loss(base + A_q(Q(r)), 0). The published loss can add an overflow penalty,
  out_penalty * sum |tgt - pred| over the targets outside [min pred, max pred] (``--out_penalty``: 0 in the
  published LSUN script, 1.0 where a script calls `layer_reconstruction_modiff` without it); not implemented.

The losses of different layers are independent, so the layers of one block are fitted together (one
optimiser); that equals fitting them one after the other. Their inputs are full-precision activations, which no
calibration step changes, so one pair of capture passes gathers them for as many consecutive blocks as
``capture_budget`` bytes hold (`reconstruct.grouped_captures`), where a pass per block would run the network's front
again for every block; the tensors are the same either way.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from modiff.quant.ptq.data import CalibData
from modiff.quant.ptq.progress import UnitProgress, act_tensors, restore_acts
from modiff.quant.layers.direct import QuantLayer
from modiff.quant.ptq.reconstruct import (CAPTURE_BUDGET, Unit, fit_scales, freeze_scales, grouped_captures,
                                      learnable_scales, lp_loss, mean_loss, static_quantizers)
from modiff.utils.progress import progress_bar

__all__ = ["ActCalibConfig", "learn_residual_step_sizes", "residual_pairs", "start_from_observers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActCalibConfig:
    """Activation calibration; the defaults are the published Q-Diffusion values (5k iterations, lr 4e-4,
    Lp loss with p = 2.4, Adam with cosine annealing).

    ``learn`` False keeps the observer start (the MoDiff README's min-max calibration). The observer kind
    (min-max, MSE, ...) is the QuantConfig's ``activation.observer``. Speed settings as in AdaRoundConfig.
    """

    iters: int = 5_000
    batch_size: int = 32
    lr: float = 4e-4
    p: float = 2.4
    learn: bool = True
    seed: int = 0
    log_every: int = 1000
    cuda_graphs: bool = True
    autocast: bool = False
    storage_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError(f"iters, batch_size and log_every must be >= 1, got {self.iters}, "
                             f"{self.batch_size}, {self.log_every}")
        if self.lr <= 0 or self.p <= 0:
            raise ValueError(f"lr and p must be > 0, got {self.lr} and {self.p}")
        if self.storage_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"storage_dtype must be float16, bfloat16 or float32, got {self.storage_dtype!r}")


@torch.no_grad()
def residual_pairs(layer: QuantLayer, fp_layer: nn.Module, a_t: Tensor, a_before: Tensor, dtype: torch.dtype,
                   chunk: int = 256) -> tuple[Tensor, Tensor]:
    """(r, base): r = a_t - a_before and base = A_q(a_before) - A(a_t) (biases cancel), in ``dtype``."""
    rs, bases = [], []
    for start in range(0, a_t.shape[0], chunk):
        now, before = a_t[start : start + chunk].float(), a_before[start : start + chunk].float()
        rs.append((now - before).to(dtype))
        fp_out = layer.op(now, fp_layer.weight.float(), None)
        bases.append((layer.op(before, layer.weight_q.float(), None) - fp_out).to(dtype))
    return torch.cat(rs), torch.cat(bases)


@torch.no_grad()
def start_from_observers(layer: QuantLayer, r: Tensor, chunk: int = 256) -> None:
    """The quantizer's observers see every row of ``r`` (residuals; for a direct layer, its inputs); their qparams
    become its starting scales."""
    act = layer.act
    assert act is not None
    for obs in act.observers:
        obs.reset()
    act.observing = True
    try:
        for start in range(0, r.shape[0], chunk):
            act(r[start : start + chunk].float())
    finally:
        act.observing = False
    act.freeze()


Layers = Sequence[QuantLayer]


def _residual_inputs(fp_model: nn.Module, data: CalibData, pending: Sequence[tuple[Unit, Layers]], batch: int,
                     dtype: torch.dtype, budget: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Per pending unit, in order: (a_t, a_before) of each of its layers, all rows, a group of units per pass."""
    requests = [(unit.name, {layer.name: "input" for layer in layers}) for unit, layers in pending]
    sources = [(data.x, data.t), (data.x_before, data.t_before)]
    for (_, layers), (now, before) in zip(pending, grouped_captures(fp_model, sources, requests, batch, dtype, budget)):
        yield [(now[layer.name][0], before[layer.name][0]) for layer in layers]


def _unit_pairs(fp_model: nn.Module, layers: Layers, inputs: Sequence[tuple[Tensor, Tensor]],
                dtype: torch.dtype) -> list[Tensor]:
    """[r_1, base_1, r_2, base_2, ...] for a unit's layers from their captured (a_t, a_before)."""
    return [t for layer, (a_t, a_before) in zip(layers, inputs)
            for t in residual_pairs(layer, fp_model.get_submodule(layer.name), a_t, a_before, dtype)]


def learn_residual_step_sizes(mq_model: nn.Module, fp_model: nn.Module, data: CalibData, units: Sequence[Unit],
                              config: ActCalibConfig, capture_batch: int = 256, progress: bool = True,
                              resume: Optional[UnitProgress] = None,
                              capture_budget: int = CAPTURE_BUDGET) -> list[dict[str, Any]]:
    """Calibrate the residual quantizers of a modulated ``mq_model`` (weights final) unit by unit; with
    ``resume``, finished units are saved there and put back from there (see `modiff.quant.ptq.progress`).
    Records per unit as `reconstruct.learn_step_sizes`'s (the losses when ``config.learn``); the first unit of a
    capture group (module docstring) has the group's capture in its seconds."""
    dtype = getattr(torch, config.storage_dtype)
    plan = []
    for index, unit in enumerate(units):
        layers = [mq_model.get_submodule(n) for n in unit.layers]
        layers = [layer for layer in layers if layer.act is not None and not layer.act.config.dynamic]
        if layers:
            plan.append((index, unit, layers, resume.load("residual-step-sizes", index, unit.name) if resume is not None else None))
    inputs = _residual_inputs(fp_model, data, [(unit, layers) for _, unit, layers, done in plan if done is None],
                              capture_batch, dtype, capture_budget)
    records = []
    for index, unit, layers, done in progress_bar(plan, "residual step sizes", progress, unit="unit"):
        if done is not None:
            restore_acts(layers, done[0])
            records.append(done[1])
            continue
        started = time.time()
        cached = _unit_pairs(fp_model, layers, next(inputs), dtype)
        for layer, r in zip(layers, cached[::2]):
            start_from_observers(layer, r)
        record: dict[str, Any] = {"unit": unit.name, "layers": [layer.name for layer in layers]}
        if config.learn:
            quantizers = static_quantizers(layers)
            scales = learnable_scales(quantizers)

            def loss_fn(batch: Sequence[Tensor], layers: Sequence[QuantLayer] = layers) -> Tensor:
                zero = batch[1].new_zeros(())
                losses = [lp_loss(base + layer.op(layer.act(r), layer.weight_q, None).float(), zero, config.p)
                          for layer, r, base in zip(layers, batch[::2], batch[1::2])]
                return torch.stack(losses).sum()

            loss_start = mean_loss(loss_fn, cached, capture_batch)
            try:
                history = fit_scales(loss_fn, scales, cached, config, unit.name)
            finally:
                freeze_scales(quantizers)
            record.update(loss_first=history[0], loss_last=history[-1], loss_start=loss_start,
                          loss_learned=mean_loss(loss_fn, cached, capture_batch))
        record["seconds"] = round(time.time() - started, 3)
        records.append(record)
        if resume is not None:
            resume.save("residual-step-sizes", index, unit.name, act_tensors(layers), record)
    return records
