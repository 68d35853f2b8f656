"""BRECQ-style reconstruction: blocks (and lone layers) fitted in forward order to full-precision outputs.

A unit is a block of the UNet (ResnetBlock, AttnBlock, Upsample, Downsample: the blocks of Q-Diffusion's
DDIM model) or a quantized layer outside every block (time-embedding linears, conv_in, conv_out). For
each unit in forward order:

- inputs: the unit's inputs in the QUANTIZED model, where every earlier unit is already final (hard
  rounding; learned step sizes), so each unit learns to absorb the error that reaches it;
- target: the unit's output in the full-precision model;
- loss: sum over channels of |out_q - out_fp|^p, mean over the other dims (`lp_loss`, as published).

Inputs and targets of all calibration samples are captured with hooks: one forward pass per calibration
batch and model, stopped right after the unit (so the rest of the network is not run), and cached on
the device in a compact dtype for the iterations that follow. The inputs come from the quantized model, which
each unit changes, so they are captured unit by unit; the targets are full-precision outputs, which nothing
changes, so one pass gathers them for as many consecutive units as ``capture_budget`` bytes hold
(`grouped_captures`): the same tensors, without running the network's front once per unit.
AdaRound learns the rounding of every
layer of the unit at once (`reconstruct_weights`); learned step sizes refine the static activation
scales of the unit's layers, weights fixed (`learn_step_sizes`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from modiff.quant.ptq.adaround import AdaRoundConfig, AdaRoundWeight, beta_at
from modiff.quant.ptq.data import CalibData
from modiff.quant.layers.direct import ActQuantizer, QuantLayer, weight_grid
from modiff.quant.primitives import MIN_SCALE
from modiff.quant.ptq.optimize import LoopConfig, cosine_lr, make_adam, run_loop
from modiff.quant.ptq.progress import UnitProgress, act_tensors, restore_acts, restore_weights, weight_tensors
from modiff.utils.hooks import Capture, ModelHook, attach
from modiff.utils.progress import progress_bar

__all__ = ["BLOCK_TYPES", "Unit", "reconstruction_units", "capture", "grouped_captures", "lp_loss", "reconstruct_weights",
           "learn_step_sizes", "capture_unit", "static_quantizers", "learnable_scales", "freeze_scales", "fit_scales",
           "unit_loss"]

log = logging.getLogger(__name__)

BLOCK_TYPES: tuple[str, ...] = ("ResnetBlock", "AttnBlock", "Upsample", "Downsample")
Tap = Literal["input", "output"]
CAPTURE_BUDGET = 2 * 2**30  # bytes of full-precision captures held at once (all sources of a group together)


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: a block's (or a lone layer's) qualified name and its quantized layers."""

    name: str
    layers: tuple[str, ...]


def lp_loss(pred: Tensor, target: Tensor, p: float) -> Tensor:
    """sum over dim 1 of |pred - target|^p, mean over the other dims (BRECQ's reduction)."""
    return (pred - target).abs().pow(p).sum(1).mean()


@torch.no_grad()
def reconstruction_units(qmodel: nn.Module, data: CalibData, block_types: Sequence[str] = BLOCK_TYPES) -> list[Unit]:
    """The units of ``qmodel`` in forward order (found by one call on one calibration input).

    The outermost module of a ``block_types`` type that holds quantized layers is a block; quantized
    layers outside every block are units of their own. ``qmodel`` must run without calibration (weights
    quantized, activations dynamic or full precision).
    """
    layers = [name for name, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    blocks = [name for name, m in qmodel.named_modules() if type(m).__name__ in block_types]
    blocks = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks)]
    members = {b: tuple(n for n in layers if n.startswith(b + ".")) for b in blocks}
    members = {b: m for b, m in members.items() if m}
    inside = {n for m in members.values() for n in m}
    members.update({n: (n,) for n in layers if n not in inside})
    order: list[str] = []
    with attach("modiff.ptq.units", [(qmodel.get_submodule(name), _CallOrder(name, order)) for name in members]):
        qmodel(data.x[:1].float(), data.t[:1])
    missing = sorted(set(members) - set(order))
    if missing:
        raise ValueError(f"units never called in a forward pass (cannot be reconstructed): {missing}")
    return [Unit(name, members[name]) for name in order]


class _CallOrder(ModelHook):
    """Appends its module's name to `order` at the module's first call."""

    def __init__(self, name: str, order: list[str]):
        self.name, self.order = name, order

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.name not in self.order:
            self.order.append(self.name)


class _Stop(Exception):
    """Ends a forward pass once the unit being captured has run."""


class _Halt(ModelHook):
    def post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise _Stop


@torch.no_grad()
def capture(model: nn.Module, x: Tensor, t: Tensor, taps: Mapping[str, Tap], stop: str, batch_size: int,
            dtype: torch.dtype) -> dict[str, list[Tensor]]:
    """Tensors at ``taps`` (module name -> its positional tensor inputs, or its output) for all rows of x.

    One forward per batch of ``batch_size`` rows, stopped after module ``stop`` has run. Returns, per tap,
    a list of (N, ...) tensors in ``dtype`` on x's device (one per input argument, or the output).
    """
    def copies(tensors: Sequence[Any]) -> list[Tensor]:
        return [a.detach().to(dtype, copy=True) for a in tensors if isinstance(a, Tensor)]

    captures = {name: Capture("input", keep=copies) if kind == "input" else Capture("output", keep=lambda out: copies([out]))
                for name, kind in taps.items()}
    with attach("modiff.ptq.capture", [(model.get_submodule(name), c) for name, c in captures.items()]), \
            attach("modiff.ptq.stop", [(model.get_submodule(stop), _Halt())]):  # after the taps: they run first
        for start in range(0, x.shape[0], batch_size):
            try:
                model(x[start : start + batch_size].float(), t[start : start + batch_size])
            except _Stop:
                pass
    return {name: [torch.cat(parts) for parts in zip(*c.values)] for name, c in captures.items()}


Request = tuple[str, Mapping[str, Tap]]  # (the unit to stop after, the taps wanted up to there)


def _capture_groups(model: nn.Module, sources: Sequence[tuple[Tensor, Tensor]], requests: Sequence[Request],
                    dtype: torch.dtype, budget: int) -> list[list[Request]]:
    """``requests`` cut into runs of consecutive ones whose captures over every source fit ``budget`` bytes
    together, sized by one probe sample; a request over the budget alone makes a group of its own."""
    x, t = sources[0]
    taps = {name: tap for _, wanted in requests for name, tap in wanted.items()}
    probe = capture(model, x[:1], t[:1], taps, requests[-1][0], 1, dtype)
    per_sample = {name: sum(p.numel() for p in tensors) * dtype.itemsize for name, tensors in probe.items()}
    groups: list[list[Request]] = []
    used = budget
    for request in requests:
        need = len(sources) * x.shape[0] * sum(per_sample[name] for name in request[1])
        if used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(request)
        used += need
    return groups


def grouped_captures(model: nn.Module, sources: Sequence[tuple[Tensor, Tensor]], requests: Sequence[Request],
                     batch_size: int, dtype: torch.dtype, budget: int = CAPTURE_BUDGET
                     ) -> Iterator[list[dict[str, list[Tensor]]]]:
    """Per request, in order, per source (x, t): `capture`'s {tap: tensors} for the request's taps, all rows.

    One pass per source serves a group of consecutive requests (`_capture_groups`), stopped after the group's
    last unit; the tensors equal one pass per request's. A tap that the model calls again before the group's
    last unit would gather rows twice: such a group is captured request by request, as each stops at its own
    unit. ``model`` must not change while the iterator is consumed (a full-precision model).
    """
    n = sources[0][0].shape[0]
    for group in _capture_groups(model, sources, requests, dtype, budget) if requests else []:
        taps = {name: tap for _, wanted in group for name, tap in wanted.items()}
        captured = [capture(model, x, t, taps, group[-1][0], batch_size, dtype) for x, t in sources]
        if len(group) > 1 and any(v[0].shape[0] != n for one in captured for v in one.values()):
            del captured
            yield from (out for request in group for out in grouped_captures(model, sources, [request], batch_size,
                                                                              dtype, 0))
            continue
        for _, wanted in group:
            yield [{name: one.pop(name) for name in wanted} for one in captured]


def capture_unit(qmodel: nn.Module, fp_model: nn.Module, data: CalibData, unit: Unit, batch_size: int,
                 dtype: torch.dtype, target: Optional[list[Tensor]] = None) -> list[Tensor]:
    """[*inputs of the unit in qmodel, output of the unit in fp_model], each (N, ...); ``target`` when given
    is that output, captured already (`grouped_captures`)."""
    inputs = capture(qmodel, data.x, data.t, {unit.name: "input"}, unit.name, batch_size, dtype)[unit.name]
    if target is None:
        target = capture(fp_model, data.x, data.t, {unit.name: "output"}, unit.name, batch_size, dtype)[unit.name]
    return inputs + target


def _fp_targets(fp_model: nn.Module, data: CalibData, units: Sequence[Unit], batch_size: int, dtype: torch.dtype,
                budget: int) -> Iterator[list[Tensor]]:
    """Each unit's full-precision output over all calibration rows, in order, a group of units per pass."""
    requests = [(unit.name, {unit.name: "output"}) for unit in units]
    for (name, _), (outputs,) in zip(requests, grouped_captures(fp_model, [(data.x, data.t)], requests,
                                                                batch_size, dtype, budget)):
        yield outputs[name]


def _loop(config: Any, desc: str) -> LoopConfig:
    return LoopConfig(iters=config.iters, batch_size=config.batch_size, seed=config.seed, log_every=config.log_every,
                      cuda_graphs=config.cuda_graphs, autocast=config.autocast)


def _attach_rounding(layer: QuantLayer, config: AdaRoundConfig) -> tuple[AdaRoundWeight, Tensor, Tensor]:
    assert layer.config.weight is not None
    scale, zero_point = weight_grid(layer.weight, layer.config.weight, layer.split, method=config.init, p=config.init_p)
    rounding = AdaRoundWeight(layer.weight, scale, zero_point, layer.config.weight.spec)
    layer.rounding = rounding
    return rounding, scale, zero_point


def _fit_rounding(unit_module: nn.Module, roundings: list[AdaRoundWeight], cached: list[Tensor],
                  config: AdaRoundConfig, desc: str) -> list[float]:
    device = cached[0].device
    loop = _loop(config, desc)
    params = [r.v for r in roundings]
    optimizer, _ = make_adam(params, config.lr, device, loop)
    beta, weight = torch.zeros((), device=device), torch.zeros((), device=device)

    def schedule(i: int) -> None:
        b, w = beta_at(i, config)
        beta.fill_(b)
        weight.fill_(w)

    def step(batch: Sequence[Tensor]) -> Tensor:
        *args, target = batch
        rec = lp_loss(unit_module(*args).float(), target, config.p)
        reg = torch.stack([r.regulariser(beta) for r in roundings]).sum()
        (rec + weight * reg).backward()
        optimizer.step()
        return rec.detach()

    return run_loop(step, cached, loop, schedule, params, desc)


def reconstruct_weights(wq_model: nn.Module, fp_model: nn.Module, data: CalibData, units: Sequence[Unit],
                        config: AdaRoundConfig, capture_batch: int = 256, progress: bool = True,
                        resume: Optional[UnitProgress] = None,
                        capture_budget: int = CAPTURE_BUDGET) -> list[dict[str, Any]]:
    """AdaRound every unit of the weight-quantized ``wq_model`` in order; hard rounding replaces weight_q.
    With ``resume``, every finished unit is saved there, and units found there are put back, not redone.

    Returns one record per unit: name, layers, seconds, reconstruction loss of the first and last
    logging windows (soft rounding), the fraction of weights rounded away from the nearest grid point,
    and the loss over all calibration inputs with hard weights, rounded to nearest (``loss_nearest``) and
    as AdaRound decided (``loss_adaround``), on the same grid. The first unit of a target group (module
    docstring) has the group's capture in its seconds.
    """
    dtype = getattr(torch, config.storage_dtype)
    plan = [(index, unit, resume.load("adaround", index, unit.name) if resume is not None else None)
            for index, unit in enumerate(units)]
    targets = _fp_targets(fp_model, data, [unit for _, unit, done in plan if done is None], capture_batch, dtype,
                          capture_budget)
    records = []
    for index, unit, done in progress_bar(plan, "AdaRound", progress, unit="unit"):
        if done is not None:  # finished before an interruption: put back as it was
            restore_weights(wq_model, unit.layers, done[0])
            records.append(done[1])
            continue
        started = time.time()
        cached = capture_unit(wq_model, fp_model, data, unit, capture_batch, dtype, next(targets))
        layers = [wq_model.get_submodule(n) for n in unit.layers]
        attached = [_attach_rounding(layer, config) for layer in layers]
        try:
            history = _fit_rounding(wq_model.get_submodule(unit.name), [a[0] for a in attached], cached, config, unit.name)
        finally:
            for layer in layers:
                layer.rounding = None
        unit_module = wq_model.get_submodule(unit.name)
        for layer, (rounding, scale, zero_point) in zip(layers, attached):
            layer.set_weight_codes(rounding.nearest_codes(), scale, zero_point)
        loss_nearest = unit_loss(unit_module, cached, config.p, capture_batch)
        flipped, total = 0.0, 0
        for layer, (rounding, scale, zero_point) in zip(layers, attached):
            codes = rounding.hard_codes()
            flipped += float((codes != rounding.nearest_codes()).sum())
            total += codes.numel()
            layer.set_weight_codes(codes, scale, zero_point)
        records.append({"unit": unit.name, "layers": list(unit.layers), "seconds": round(time.time() - started, 3),
                        "loss_first": history[0], "loss_last": history[-1], "flipped": flipped / max(total, 1),
                        "loss_nearest": loss_nearest, "loss_adaround": unit_loss(unit_module, cached, config.p, capture_batch)})
        if resume is not None:
            resume.save("adaround", index, unit.name, weight_tensors(layers), records[-1])
    return records


@torch.no_grad()
def mean_loss(loss_fn: Callable[[Sequence[Tensor]], Tensor], cached: Sequence[Tensor], batch: int) -> float:
    """``loss_fn`` (a mean over its rows, as `lp_loss`) over all cached calibration rows, ``batch`` rows at a time:
    what a fit bought, measured on every input rather than on the last logging window of training."""
    total, count = 0.0, cached[0].shape[0]
    for start in range(0, count, batch):
        chunk = [c[start:start + batch].float() for c in cached]
        total += float(loss_fn(chunk)) * chunk[0].shape[0]
    return total / count


def unit_loss(unit_module: nn.Module, cached: Sequence[Tensor], p: float, batch: int) -> float:
    """Reconstruction loss (`lp_loss`) of a unit over all its cached calibration inputs, hard weights:
    how AdaRound's decisions compare with rounding to the nearest point of the same grid."""
    return mean_loss(lambda chunk: lp_loss(unit_module(*chunk[:-1]).float(), chunk[-1], p), cached, batch)


def static_quantizers(layers: Sequence[QuantLayer]) -> list[ActQuantizer]:
    return [layer.act for layer in layers if layer.act is not None and not layer.act.config.dynamic]


def learnable_scales(quantizers: Sequence[ActQuantizer]) -> list[Tensor]:
    """Make every quantizer's scales leaf tensors that require grad (in place); returns them."""
    scales = []
    for q in quantizers:
        if not q.scales:
            raise RuntimeError("activation quantizer has no initial qparams: initialise them (min-max/MSE) first")
        q.scales = [s.detach().clone().requires_grad_(True) for s in q.scales]
        scales.extend(q.scales)
    return scales


def freeze_scales(quantizers: Sequence[ActQuantizer]) -> None:
    for q in quantizers:
        q.scales = [s.detach().clamp(min=MIN_SCALE) for s in q.scales]


def fit_scales(loss_fn: Callable[[Sequence[Tensor]], Tensor], scales: list[Tensor], cached: list[Tensor],
               config: Any, desc: str) -> list[float]:
    """Adam with cosine-annealed lr on ``scales`` minimising ``loss_fn(batch)``; scales kept >= MIN_SCALE."""
    loop = _loop(config, desc)
    optimizer, set_lr = make_adam(scales, config.lr, cached[0].device, loop)

    def step(batch: Sequence[Tensor]) -> Tensor:
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(scales, MIN_SCALE)
        return loss.detach()

    return run_loop(step, cached, loop, lambda i: set_lr(cosine_lr(i, config.iters, config.lr)), scales, desc)


def learn_step_sizes(qmodel: nn.Module, fp_model: nn.Module, data: CalibData, units: Sequence[Unit], config: Any,
                     capture_batch: int = 256, progress: bool = True, resume: Optional[UnitProgress] = None,
                     capture_budget: int = CAPTURE_BUDGET) -> list[dict[str, Any]]:
    """Refine the static activation scales of a direct-mode ``qmodel`` unit by unit (weights fixed).

    ``config`` is an `ActCalibConfig`. The scales must hold their min-max/MSE start already. ``resume``
    as in `reconstruct_weights`. Records per unit: the mean loss of the first and last logging windows of
    training, and over all the unit's calibration inputs with the start scales (``loss_start``) and the
    learned ones (``loss_learned``); the first unit of a target group has the group's capture in its seconds.
    """
    dtype = getattr(torch, config.storage_dtype)
    plan = []
    for index, unit in enumerate(units):
        layers = [qmodel.get_submodule(n) for n in unit.layers]
        quantizers = static_quantizers(layers)
        if quantizers:
            plan.append((index, unit, layers, quantizers,
                         resume.load("step-sizes", index, unit.name) if resume is not None else None))
    targets = _fp_targets(fp_model, data, [unit for _, unit, *_, done in plan if done is None], capture_batch, dtype,
                          capture_budget)
    records = []
    for index, unit, layers, quantizers, done in progress_bar(plan, "step sizes", progress, unit="unit"):
        if done is not None:
            restore_acts([layer for layer in layers if layer.act in quantizers], done[0])
            records.append(done[1])
            continue
        started = time.time()
        cached = capture_unit(qmodel, fp_model, data, unit, capture_batch, dtype, next(targets))
        module = qmodel.get_submodule(unit.name)
        scales = learnable_scales(quantizers)

        def loss_fn(batch: Sequence[Tensor], module: nn.Module = module) -> Tensor:
            *args, target = batch
            return lp_loss(module(*args).float(), target, config.p)

        loss_start = mean_loss(loss_fn, cached, capture_batch)
        try:
            history = fit_scales(loss_fn, scales, cached, config, unit.name)
        finally:
            freeze_scales(quantizers)
        records.append({"unit": unit.name, "seconds": round(time.time() - started, 3),
                        "loss_first": history[0], "loss_last": history[-1], "loss_start": loss_start,
                        "loss_learned": mean_loss(loss_fn, cached, capture_batch)})
        if resume is not None:
            resume.save("step-sizes", index, unit.name, act_tensors([layer for layer in layers if layer.act in quantizers]), records[-1])
    return records

