"""Finished calibration units on disk: an interrupted calibration resumes where it stopped.

AdaRound, learned step sizes and residual step sizes work unit by unit (a block or a lone layer), each
unit seeing the earlier ones final. `UnitProgress(folder, settings)` writes ``settings.json`` first (the
calibration's identity: config, recipe, data; a folder holding other settings is refused), then one
safetensors file per finished unit (``<phase>-<index>.safetensors``, written atomically): the unit's
weight codes and grids or activation qparams, with its report record in the file's metadata. On a
resume the finished units are put back as they were, bit for bit, and the loop goes on with the first
unit not on disk; every iteration loop seeds its own batch order, so the result equals that of an
uninterrupted run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from modiff.quant.layers.direct import QuantLayer
from modiff.utils.runs import atomic_path, write_json

__all__ = ["UnitProgress", "weight_tensors", "restore_weights", "act_tensors", "restore_acts"]

log = logging.getLogger(__name__)


class UnitProgress:
    """The finished units of one calibration under ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, settings: Mapping[str, Any]):
        self.folder = Path(folder)
        wanted = json.loads(json.dumps(settings, default=str))
        path = self.folder / "settings.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != wanted:
                diff = [k for k in dict.fromkeys([*saved, *wanted]) if saved.get(k) != wanted.get(k)]
                raise ValueError(f"{self.folder} holds the progress of a calibration with other settings (differing: "
                                 f"{', '.join(diff)}); use a new --out folder, or delete {self.folder}")
            log.info("resuming the calibration in %s", self.folder)
        else:
            write_json(wanted, path)

    def _path(self, phase: str, index: int) -> Path:
        return self.folder / f"{phase}-{index:03d}.safetensors"

    def load(self, phase: str, index: int, unit: str) -> Optional[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """The tensors and record of unit ``index`` of ``phase`` if it finished, else None. A damaged
        file (a crash cannot leave one: writes are atomic) is removed and the unit done again."""
        path = self._path(phase, index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("%s cannot be read (%s): removed, the unit is calibrated again", path, err)
            path.unlink()
            return None
        if meta.get("unit") != unit:
            raise ValueError(f"{path} holds unit {meta.get('unit')!r}, not {unit!r}: the model's units changed; "
                             f"use a new --out folder, or delete {self.folder}")
        return tensors, json.loads(meta["record"])

    def save(self, phase: str, index: int, unit: str, tensors: Mapping[str, torch.Tensor],
             record: Mapping[str, Any]) -> None:
        with atomic_path(self._path(phase, index)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"unit": unit, "record": json.dumps(record)})


def weight_tensors(layers: Sequence[QuantLayer]) -> dict[str, torch.Tensor]:
    """The weight codes and grids of ``layers`` (as `restore_weights` puts them back)."""
    out = {}
    for layer in layers:
        out.update({f"{layer.name}.weight_code": layer.weight_codes(), f"{layer.name}.weight_scale": layer.weight_scale,
                    f"{layer.name}.weight_zero_point": layer.weight_zero_point})
    return out


def restore_weights(model: nn.Module, names: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> None:
    for name in names:
        model.get_submodule(name).set_weight_codes(tensors[f"{name}.weight_code"], tensors[f"{name}.weight_scale"],
                                                   tensors[f"{name}.weight_zero_point"])


def act_tensors(layers: Sequence[QuantLayer]) -> dict[str, torch.Tensor]:
    """The static activation qparams of ``layers`` (as `restore_acts` puts them back)."""
    out = {}
    for layer in layers:
        for k, (scale, zero_point) in enumerate(zip(layer.act.scales, layer.act.zero_points)):
            out[f"{layer.name}.act_scale.{k}"] = scale
            out[f"{layer.name}.act_zero_point.{k}"] = zero_point
    return out


def restore_acts(layers: Sequence[QuantLayer], tensors: Mapping[str, torch.Tensor]) -> None:
    for layer in layers:
        parts = len([k for k in tensors if k.startswith(f"{layer.name}.act_scale.")])
        device = layer.weight.device
        layer.act.scales = [tensors[f"{layer.name}.act_scale.{k}"].to(device) for k in range(parts)]
        layer.act.zero_points = [tensors[f"{layer.name}.act_zero_point.{k}"].to(device) for k in range(parts)]
