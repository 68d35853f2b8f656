"""Saving and loading calibrated quantized models: integer weight codes, qparams and the QuantConfig.

A folder holds ``quantized.safetensors`` and ``manifest.json`` (the QuantConfig, the model it belongs
to, the calibration settings and report, the environment). Per quantized layer NAME:

==============================  =======================================================================
``NAME.weight_code``             integer codes q of the weights (int8/uint8/int16/int32, the smallest that
                                 holds [qmin, qmax]): the rounding decisions, AdaRound's included
``NAME.weight_scale``, ``..zero_point``  the grid (float32), weight_q = s (q - z)
``NAME.act_scale.K``, ``NAME.act_zero_point.K``  static activation qparams, K = 0 (and 1 for the second
                                 half of a split shortcut)
==============================  =======================================================================

`load_quantized(model, folder)` quantizes the full-precision ``model`` with the saved config and puts
the saved values in place; the result computes exactly what the saved model computed.

Models that share their weights (every calibrated preset of one weight quantization reuses one AdaRound)
can be saved with ``weights_from=`` a folder that holds the same codes: the manifest then names that
folder (``weights_from``, relative) and the weight tensors are read from there, not written twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modiff.quant.api import quant_layers, quantize
from modiff.quant.config import QuantConfig
from modiff.quant.primitives import QuantSpec
from modiff.utils.runs import atomic_path, ensure_writable_dir, environment, write_json

__all__ = ["save_quantized", "load_quantized", "load_weight_codes", "read_manifest", "code_dtype"]

TENSORS_FILE = "quantized.safetensors"
KIND = "quantized-model"
WEIGHT_KEYS = ("weight_code", "weight_scale", "weight_zero_point")


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """The smallest integer dtype that holds every code in [qmin, qmax]."""
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= spec.qmin and spec.qmax <= info.max:
            return dtype
    raise AssertionError(f"no integer dtype holds [{spec.qmin}, {spec.qmax}]")


def _layer_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quant_layers(qmodel).items():
        if layer.config.weight is not None:
            tensors[f"{name}.weight_code"] = layer.weight_codes().to(code_dtype(layer.config.weight.spec))
            tensors[f"{name}.weight_scale"] = layer.weight_scale.float()
            tensors[f"{name}.weight_zero_point"] = layer.weight_zero_point.float()
        act = layer.act
        if act is None or act.config.dynamic:
            continue
        if not act.scales:
            raise ValueError(f"layer {name} has an uncalibrated static activation quantizer; calibrate before saving")
        for k, (scale, zero_point) in enumerate(zip(act.scales, act.zero_points)):
            tensors[f"{name}.act_scale.{k}"] = scale.detach().float()
            tensors[f"{name}.act_zero_point.{k}"] = zero_point.detach().float()
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_quantized(qmodel: nn.Module, folder: str | Path, metadata: Optional[Mapping[str, Any]] = None,
                   weights_from: Optional[str | Path] = None) -> Path:
    """Write a quantized model's codes, qparams and config into ``folder``; the manifest is written last.

    ``weights_from``: a saved model with the same weight quantization and the same codes (checked): the
    weight tensors are read from there on loading instead of being written again.
    """
    config = getattr(qmodel, "quant_config", None)
    if not isinstance(config, QuantConfig):
        raise TypeError("save_quantized takes a model made by modiff.quantize / modiff.quant.ptq.calibrate")
    out = ensure_writable_dir(Path(folder))
    if (out / "manifest.json").exists():
        raise ValueError(f"{out} already holds a saved model; choose a new folder")
    tensors = _layer_tensors(qmodel)
    manifest: dict[str, Any] = {"kind": KIND, "quant_config": config.to_dict()}
    if weights_from is not None:
        _check_same_codes(tensors, config, Path(weights_from))
        tensors = {k: v for k, v in tensors.items() if not k.endswith(WEIGHT_KEYS)}
        manifest["weights_from"] = Path(os.path.relpath(Path(weights_from).resolve(), out.resolve())).as_posix()
    with atomic_path(out / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp))
    device = next(qmodel.parameters()).device
    manifest.update(metadata=dict(metadata or {}), environment=environment(device))
    write_json(manifest, out / "manifest.json")
    return out


def _check_same_codes(tensors: Mapping[str, torch.Tensor], config: QuantConfig, source: Path) -> None:
    _check_weight_config(config, source)
    theirs = _weight_tensors(source)
    for key, value in tensors.items():
        if key.endswith(WEIGHT_KEYS) and not (key in theirs and torch.equal(theirs[key], value)):
            raise ValueError(f"weights_from={source} holds other weights than the model saved ({key} differs); "
                             f"pass the folder whose weight codes the model uses, or save without weights_from")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a saved quantized model (raises if ``folder`` holds none)."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no saved quantized model (no manifest.json); make one with "
                                f"`modiff calibrate --model M --data DATA --preset P --out {folder}`")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != KIND:
        raise ValueError(f"{path} describes a {manifest.get('kind')!r}, not a {KIND!r}")
    return manifest


def load_quantized(model: nn.Module, folder: str | Path) -> nn.Module:
    """Quantize the full-precision ``model`` with the saved config and restore codes and qparams."""
    manifest = read_manifest(folder)
    config = QuantConfig.from_dict(manifest["quant_config"])
    qmodel = quantize(model, config.with_weight_codes("nearest"))  # the codes come from the folder
    qmodel.quant_config = config
    saved = load_file(str(Path(folder) / TENSORS_FILE))
    if manifest.get("weights_from") is not None:
        saved.update(_weight_tensors(Path(folder)))
    layers = quant_layers(qmodel)
    known = {_layer_of(key) for key in saved}
    if known - set(layers):
        raise ValueError(f"{folder} holds layers the model lacks: {sorted(known - set(layers))[:5]}; "
                         f"load it into the model it was calibrated for")
    for name, layer in layers.items():
        _restore(layer, name, saved, folder)
    return qmodel


def load_weight_codes(qmodel: nn.Module, folder: str | Path) -> nn.Module:
    """Put the weight codes and grids saved in ``folder`` into ``qmodel`` (in place; returns it).

    The folder's model must quantize weights as ``qmodel`` does (bits, grids, layers, split shortcut);
    its activations and mode may differ: one AdaRound serves direct, modulated, static and dynamic presets.
    """
    _check_weight_config(qmodel.quant_config, Path(folder))
    saved = _weight_tensors(Path(folder))
    for name, layer in quant_layers(qmodel).items():
        if layer.config.weight is not None:
            _restore_weights(layer, name, saved, folder)
    return qmodel


def _weight_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weight tensors of a saved model, read from its ``weights_from`` folder when it names one."""
    source = read_manifest(folder).get("weights_from")
    if source is not None:
        return _weight_tensors(folder / source)
    return {k: v for k, v in load_file(str(folder / TENSORS_FILE)).items() if k.endswith(WEIGHT_KEYS)}


def _check_weight_config(config: QuantConfig, folder: Path) -> None:
    from modiff.quant.ptq.calibrate import weight_only_config

    theirs = QuantConfig.from_dict(read_manifest(folder)["quant_config"])
    if weight_only_config(theirs) != weight_only_config(config):
        raise ValueError(f"{folder} quantizes weights otherwise ({weight_only_config(theirs)}) than this model "
                         f"({weight_only_config(config)}); use weights calibrated for the same weight bits, "
                         f"layers and split shortcut")


def _layer_of(key: str) -> str:
    """The layer name of a saved key: NAME.weight_code, NAME.act_scale.0, ..."""
    head, kind, _ = key.rsplit(".", 2) if key.count(".") >= 2 else ("", "", "")
    return head if kind in ("act_scale", "act_zero_point") else key.rsplit(".", 1)[0]


def _split_mismatch(folder: str | Path, name: str, layer: nn.Module, what: str) -> ValueError:
    halves = "whole" if layer.split is None else "in two halves"
    return ValueError(f"{folder}: layer {name} was saved with {what}, but this model quantizes its input {halves} "
                      f"(the split-shortcut layers differ: before the fix of the published split set, conv1 / "
                      f"in_layers.2 were split too); calibrate it again with `modiff calibrate`")


def _restore_weights(layer: nn.Module, name: str, saved: Mapping[str, torch.Tensor], folder: str | Path) -> None:
    if f"{name}.weight_code" not in saved:
        raise ValueError(f"{folder} has no weight codes for layer {name}")
    scale = saved[f"{name}.weight_scale"]
    if scale.shape != layer.weight_scale.shape:  # (out, 1, ...) for one grid per row, (out, in, ...) split
        raise _split_mismatch(folder, name, layer, f"a weight grid of shape {tuple(scale.shape)} (this model "
                                                   f"needs {tuple(layer.weight_scale.shape)})")
    layer.set_weight_codes(saved[f"{name}.weight_code"], scale, saved[f"{name}.weight_zero_point"])


def _restore(layer: nn.Module, name: str, saved: Mapping[str, torch.Tensor], folder: str | Path) -> None:
    if layer.config.weight is not None:
        _restore_weights(layer, name, saved, folder)
    act = layer.act
    if act is None or act.config.dynamic:
        return
    device = layer.weight.device
    parts = 1 if act.split is None else 2
    if f"{name}.act_scale.{parts}" in saved or (parts == 2 and f"{name}.act_scale.0" in saved
                                                    and f"{name}.act_scale.1" not in saved):
        raise _split_mismatch(folder, name, layer, "a different number of activation scales")
    try:
        act.scales = [saved[f"{name}.act_scale.{k}"].to(device) for k in range(parts)]
        act.zero_points = [saved[f"{name}.act_zero_point.{k}"].to(device) for k in range(parts)]
    except KeyError as err:
        raise ValueError(f"{folder} lacks the activation qparams {err.args[0]} of layer {name}") from err
