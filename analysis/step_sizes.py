"""Did the shipped Q-Diffusion calibration learn its step sizes, and what did learning buy? Checked exactly, without
the calibration data, on the one layer whose calibration inputs need none: the first layer the network calls, the
time embedding's first linear, whose input is the sinusoidal embedding of the timestep alone. The shipped manifest
names the calibration's timesteps, so that input is the calibration's own (256 copies of each there; copies change
neither the observers nor a mean loss), and so are the layer's observer start, its learned step size and the
calibration loss with either: lp_loss(layer(a), A(a)) for a direct preset, lp_loss(A_q(a_before) - A(a) +
A_q(Q(a - a_before)), 0) for a MoDiff one (`modiff.quant.ptq.lsq`).

Calibrations that recorded every unit's loss at the observer start and as learned (over all its calibration inputs;
`summary.json` of the shipped folder) are summarized per preset as well: the first unit's record is then a check of
the data-free recomputation above, and the other units answer what the first one cannot.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from analysis import tables
from modiff.diffusion.schedules import timesteps
from modiff.quant.ptq.data import CalibDataConfig, chosen_indices
from modiff.quant.ptq.lsq import residual_pairs, start_from_observers
from modiff.quant.ptq.reconstruct import lp_loss
from modiff.quant.ptq.shipped import shipped_manifest, shipped_model, shipped_summary
from modiff.utils.selection import network_modules

__all__ = ["first_layer_input", "time_embedding_step_sizes", "recorded_unit_losses", "per_preset", "step_size_finding",
           "all_units_finding", "save_check"]


def calibration_timesteps(config: CalibDataConfig, num_timesteps: int) -> tuple[Tensor, Tensor]:
    """The timesteps ``collect_calib_data`` keeps (t) and those one sampling step before them (t_before)."""
    ts = timesteps(config.steps, config.spacing, num_timesteps)
    wanted = chosen_indices(len(ts), config.calib_steps)
    return torch.tensor([ts[i] for i in wanted]), torch.tensor([ts[i - 1] for i in wanted])


@torch.no_grad()
def first_layer_input(model: nn.Module, t: Tensor) -> tuple[str, Tensor]:
    """The first Conv2d/Linear the network calls and its input at timesteps ``t``; refused unless that input is the
    same for two different images (it must depend on the timestep alone)."""
    layers = [(name, m) for name, m in network_modules(model) if isinstance(m, (nn.Conv2d, nn.Linear))]

    def first_call(image: Tensor) -> tuple[str, Tensor]:
        calls: list[tuple[str, Tensor]] = []
        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0].float())))
                 for name, m in layers]
        try:
            model(image, t)
        finally:
            for hook in hooks:
                hook.remove()
        return calls[0]

    shape = (len(t), *model.sample_shape)
    (name, a), (_, other) = first_call(torch.zeros(shape)), first_call(torch.ones(shape))
    if not torch.equal(a, other):
        raise ValueError(f"the first layer the network calls ({name}) reads the image, not the timestep alone: "
                         f"its calibration inputs need the calibration data")
    return name, a


def time_embedding_step_sizes(model: nn.Module) -> pd.DataFrame:
    """Per preset of ``model``'s shipped calibration: the first layer's activation step size at its observer start
    and as learned, and the layer's calibration loss with each over the calibration timesteps (ratio < 1: learning
    lowered it). Empty when the model ships no calibration."""
    manifest = shipped_manifest(model)
    if manifest is None:
        return pd.DataFrame()
    data = CalibDataConfig(**manifest["settings"]["data"])
    p = manifest["settings"]["recipe"]["activations"]["p"]
    t, t_before = calibration_timesteps(data, model.schedule.num_timesteps)
    name, a_t = first_layer_input(model, t)
    _, a_before = first_layer_input(model, t_before)
    rows = [_preset_row(model, preset, name, a_t, a_before, data.torch_dtype, p) for preset in manifest["presets"]]
    return pd.DataFrame(rows)


def _preset_row(model: nn.Module, preset: str, name: str, a_t: Tensor, a_before: Tensor, dtype: torch.dtype,
                p: float) -> dict[str, Any]:
    learned = shipped_model(model, preset).get_submodule(name)
    fp_layer = model.get_submodule(name)
    modulated = learned.config.mode == "modulated"
    stored = a_t.to(dtype).float()  # the calibration keeps its captured inputs and outputs in the storage dtype
    with torch.no_grad():
        target = fp_layer(a_t).to(dtype).float()
    r, base = residual_pairs(learned, fp_layer, stored, a_before.to(dtype).float(), dtype)
    start = copy.deepcopy(learned)
    start_from_observers(start, r if modulated else a_t)  # a direct layer's observers see float32 inputs

    @torch.no_grad()
    def loss(layer: nn.Module) -> float:
        if modulated:
            return float(lp_loss(base.float() + layer.op(layer.act(r.float()), layer.weight_q, None), torch.zeros(()), p))
        return float(lp_loss(layer(stored), target, p))

    (scale_start,), (scale_learned,) = start.act.scales, learned.act.scales
    largest = float((r.float() if modulated else a_t).abs().max())
    return {"preset": preset, "layer": name, "calibration_inputs": "residuals" if modulated else "activations",
            "timesteps": len(a_t), "scale_start": float(scale_start), "scale_learned": float(scale_learned),
            "loss_start": loss(start), "loss_learned": loss(learned), "loss_ratio": loss(learned) / loss(start),
            "qmax": learned.act.spec.qmax, "largest_input": largest, "largest_over_learned": largest / float(scale_learned)}


RECORD_TOLERANCE = 1e-3  # relative: float32 sums over 5,120 inputs in another order, on another device


def recorded_unit_losses(model: nn.Module) -> pd.DataFrame:
    """One row per (preset, unit) whose calibration recorded the unit's loss over all its calibration inputs at the
    observer start and as learned (`summary.json` of the shipped calibration; calibrations before 244591f did not).
    Empty when the model ships no calibration or none of its presets recorded them."""
    summary = shipped_summary(model)
    rows = [{"preset": preset, "calibration_inputs": "residuals" if record["mode"] == "modulated" else "activations",
             "unit": unit["unit"], "loss_start": unit["loss_start"], "loss_learned": unit["loss_learned"]}
            for preset, record in (summary or {"activations": {}})["activations"].items()
            for unit in record.get("per_unit", []) if "loss_start" in unit]
    table = pd.DataFrame(rows)
    if not table.empty:  # a unit whose start loss is 0 has no ratio (as `modiff.quant.ptq.calibrate` counts them)
        table["loss_ratio"] = (table.loss_learned / table.loss_start).where(table.loss_start > 0)
    return table


def per_preset(units: pd.DataFrame) -> pd.DataFrame:
    """`recorded_unit_losses` per preset: units, units whose loss learning lowered, the median and largest
    learned/start ratio (the first two as the calibration's own summary counts them)."""
    lowered = units.assign(lowered=units.loss_learned < units.loss_start)
    grouped = lowered.groupby(["preset", "calibration_inputs"], sort=False)
    return pd.DataFrame({"units": grouped.size(), "units_lowered": grouped.lowered.sum().astype(int),
                         "median_loss_ratio": grouped.loss_ratio.median(),
                         "max_loss_ratio": grouped.loss_ratio.max()}).reset_index()


def _recorded_first_unit(table: pd.DataFrame, units: pd.DataFrame) -> pd.DataFrame:
    """``table`` (the first layer's recomputed losses) with the calibration's own records of that unit beside them,
    where it kept them."""
    if table.empty or units.empty:
        return table
    recorded = units.rename(columns={"unit": "layer", "loss_start": "recorded_loss_start",
                                     "loss_learned": "recorded_loss_learned"})
    columns = ["preset", "layer", "recorded_loss_start", "recorded_loss_learned"]
    return table.merge(recorded[columns], on=["preset", "layer"], how="left")


def all_units_finding(units: pd.DataFrame, first: pd.DataFrame, presets: int) -> str:
    """Markdown: per kind of calibration input, how many units learning lowered, over the presets (of ``presets``
    in the calibration) that recorded every unit; and whether the data-free recomputation of the first unit
    (``first``, with the records beside it) meets those records within `RECORD_TOLERANCE`."""
    if units.empty:
        return "No preset of this calibration recorded every unit's loss at the start and as learned."
    per = per_preset(units)
    recorded = per.preset.nunique()
    lines = [f"Every unit's calibration loss at its observer start and as learned, as the calibration recorded them "
             f"({recorded} of its {presets} presets, {len(units)} unit records"
             + ("" if recorded == presets else "; the other presets' calibration predates these records") + "):"]
    for inputs, group in per.groupby("calibration_inputs", sort=False):
        lines.append(f"- {inputs} ({len(group)} presets): learning lowered the loss of {int(group.units_lowered.sum())} "
                     f"of {int(group.units.sum())} units ({group.units_lowered.min()}-{group.units_lowered.max()} of "
                     f"{group.units.max()} a preset); median learned/start per preset {group.median_loss_ratio.min():.3g}-"
                     f"{group.median_loss_ratio.max():.3g}, the worst unit's {group.max_loss_ratio.min():.3g}-"
                     f"{group.max_loss_ratio.max():.3g}.")
    if "recorded_loss_start" in first:
        lines.append(_record_check(first.dropna(subset=["recorded_loss_start"])))
    return "\n".join(lines)


def _record_check(checked: pd.DataFrame) -> str:
    def gap(mine: pd.Series, record: pd.Series) -> pd.Series:
        return ((mine - record) / record).abs()

    worst = pd.concat([gap(checked.loss_start, checked.recorded_loss_start),
                       gap(checked.loss_learned, checked.recorded_loss_learned)], axis=1).max(axis=1)
    off = checked.preset[~(worst <= RECORD_TOLERANCE)]
    return (f"- The data-free recomputation of {checked.layer.iloc[0]} above meets the calibration's own record of it "
            f"within {RECORD_TOLERANCE:g} (relative) in {len(checked) - len(off)} of the {len(checked)} presets that "
            f"kept one (largest difference {worst.max():.2g})"
            + (f"; not in {', '.join(off)}: the check does not reproduce the calibration there." if len(off) else "."))


def step_size_finding(table: pd.DataFrame) -> str:
    """Markdown: whether every preset's step size moved, and where learning raised the loss rather than lowered it."""
    if table.empty:
        return "The model ships no calibration: nothing to check."
    moved = (table.scale_learned - table.scale_start).abs() > 1e-6 * table.scale_start
    raised = table[table.loss_ratio > 1]
    lines = [f"The shipped calibration's {len(table)} presets, layer {table.layer.iloc[0]} (its input is the timestep's "
             f"embedding alone, so this is its calibration loss exactly, on {table.timesteps.iloc[0]} timesteps):",
             f"- the learned step size moved from its observer start in {int(moved.sum())} of {len(table)} presets"
             + ("." if moved.all() else f"; not in {', '.join(table.preset[~moved])}, where learning did nothing.")]
    for inputs, group in table.groupby("calibration_inputs", sort=False):
        up = group[group.loss_ratio > 1]
        lines.append(f"- {inputs} ({len(group)} presets): learned/start loss {group.loss_ratio.min():.3g}-"
                     f"{group.loss_ratio.max():.3g}; learning raised the loss in {len(up)} of {len(group)}"
                     + (f" ({', '.join(up.preset)})." if len(up) else "."))
    at_flip = raised[(raised.largest_over_learned - (raised.qmax + 0.5)).abs() < 0.01]
    if len(at_flip):
        lines.append(f"- In {len(at_flip)} of the {len(raised)} presets whose loss rose, the learned step size puts the "
                     f"largest input half a step above the top level (largest / step = qmax + 0.5 within 0.01), where "
                     f"its rounding flips between the top level and the clip: the straight-through (LSQ) gradient of "
                     f"the step size settled there, not at the loss minimum.")
    return "\n".join(lines)


def save_check(model: nn.Module, out_dir: str | Path, own_calibration: bool = False) -> str:
    """`time_embedding_step_sizes` (with the calibration's own records of that unit, where it kept them) saved as
    ``table1_step_sizes`` under ``out_dir``, `recorded_unit_losses` per preset as ``table1_step_sizes_all_units``,
    and their finding, which says why where there is no table: the rows use a calibration of their own
    (``own_calibration``), the model ships none, or its first layer reads the image. Returns the finding."""
    table, units = pd.DataFrame(), pd.DataFrame()
    if own_calibration:
        finding = "Not checked: the Q-Diffusion rows here use the calibration their notebook made, not the shipped one."
    else:
        try:
            units = recorded_unit_losses(model)
            table = _recorded_first_unit(time_embedding_step_sizes(model), units)
            finding = step_size_finding(table)
        except ValueError as err:
            finding = f"Not checked: {err}."
        manifest = shipped_manifest(model)
        if manifest is not None and not (units.empty and table.empty):
            finding += "\n\n" + all_units_finding(units, table, len(manifest["presets"]))
    if not table.empty:
        tables.save(table, "table1_step_sizes", out_dir)
    if not units.empty:
        tables.save(per_preset(units), "table1_step_sizes_all_units", out_dir)
    tables.save_finding(finding, "table1_step_sizes", out_dir)
    return finding
