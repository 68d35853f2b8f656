"""Shipped calibrations: AdaRound weight codes and Q-Diffusion activation scales that come with a model.

A model folder (``data/fmnist-ddim``, or any folder exported by `modiff train`) may hold ``calibration/``:
a `modiff.quant.ptq.reuse` folder without its calibration data (``quantized/weights/w<bits>-<hash>/``
holds the AdaRound weights of one weight quantization, ``quantized/<preset>/`` each calibrated preset,
whose weight codes are read from the former; both in the `save_quantized` format), plus

- ``manifest.json``: the model, the calibration settings (with the iterations used against the published
  ones), the presets and weight folders it holds, and the sha256 and size of every file;
- ``summary.json``: per AdaRound unit, the reconstruction loss with round-to-nearest and with the learned
  rounding on the same grid and their ratio; per calibrated preset, the step-size losses per unit.

`modiff calibrate-shipped` (`modiff.quant.ptq.reuse.calibrate_shipped`) makes it. `modiff.quantize` with
a config whose weight codes are "adaround" (preset ``w4a4-adaround-modiff``, ...) and
`shipped_model(model, "qdiff-w4a4")` read it; both verify the checksums first.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from modiff.quant.api import register_weight_codes
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.calibrate import weight_only_config
from modiff.quant.config import QuantConfig
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.ptq.saved import load_quantized, load_weight_codes, read_manifest
from modiff.utils.checksums import sha256_file
from modiff.utils.runs import environment, write_json

__all__ = ["CALIBRATION_DIR", "PUBLISHED_ITERS", "calibration_folder", "has_shipped", "shipped_iterations", "shipped_manifest",
           "shipped_model", "shipped_summary", "shipped_weights", "with_adaround_weights", "write_shipped_manifest"]

CALIBRATION_DIR = "calibration"
KIND = "shipped-calibration"
PUBLISHED_ITERS = {"adaround": AdaRoundConfig().iters, "activations": ActCalibConfig().iters}


def _how_to_make(model: nn.Module, what: str) -> str:
    name = getattr(model, "name", "M")
    return (f"make it with `modiff calibrate-shipped --model {name} --preset {what}` (AdaRound and step sizes, "
            f"written into the model folder's {CALIBRATION_DIR}/), or calibrate elsewhere with "
            f"`modiff calibrate-data --model {name} --out DATA` and `modiff calibrate --model {name} --data DATA "
            f"--preset qdiff-w4a4 --out RUN` and pass the weights: `modiff sample --weights-from RUN`, "
            f"`modiff.quantize(model, config, weights=RUN)`")


def calibration_folder(model: nn.Module) -> Path:
    """``<model folder>/calibration``; raises for a model not loaded from a folder (a checkpoint file)."""
    folder = getattr(model, "folder", None)
    if folder is None:
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} was not loaded from a model "
                         f"folder, so it has no shipped calibration; {_how_to_make(model, 'qdiff-w4a4')}")
    return Path(folder) / CALIBRATION_DIR


def _read(model: nn.Module, what: str) -> tuple[Path, dict[str, Any]]:
    """The shipped calibration folder and its manifest, checksums verified."""
    root = calibration_folder(model)
    path = root / "manifest.json"
    if not path.is_file():
        raise ValueError(f"model {getattr(model, 'name', '?')!r} has no shipped calibration ({path} is missing); "
                         f"{_how_to_make(model, what)}")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != KIND:
        raise ValueError(f"{path} describes a {manifest.get('kind')!r}, not a {KIND!r}")
    for name, entry in manifest["files"].items():
        file = root / name
        if not file.is_file():
            raise ValueError(f"shipped calibration {root} lacks {name}, which its manifest lists; restore the "
                             f"folder (git checkout {root}) or {_how_to_make(model, what)}")
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            raise ValueError(f"checksum mismatch in shipped calibration {root}: {name} has sha256 {digest}, "
                             f"the manifest says {entry['sha256']}; the file is damaged or was changed: restore it "
                             f"(git checkout {root}) or {_how_to_make(model, what)}")
    return root, manifest


def shipped_manifest(model: nn.Module) -> Optional[dict[str, Any]]:
    """The shipped calibration's manifest, None when the model ships none (checksums not read)."""
    folder = getattr(model, "folder", None)
    path = Path(folder) / CALIBRATION_DIR / "manifest.json" if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def shipped_summary(model: nn.Module) -> Optional[dict[str, Any]]:
    """The shipped calibration's ``summary.json`` with each preset's quantization mode added (``"mode"``, from the
    preset's own manifest), checksums verified; None when the model ships no calibration."""
    if shipped_manifest(model) is None:
        return None
    root, manifest = _read(model, "qdiff-w4a4")
    summary = json.loads((root / "summary.json").read_text())
    for preset, record in summary["activations"].items():
        record["mode"] = json.loads((root / manifest["presets"][preset] / "manifest.json").read_text())["quant_config"]["mode"]
    return summary


def has_shipped(model: nn.Module, preset: str) -> bool:
    """Whether ``model`` ships a calibration of the static ``preset`` (checksums not read)."""
    manifest = shipped_manifest(model)
    return manifest is not None and preset in manifest.get("presets", {})


def shipped_iterations(model: nn.Module) -> Optional[dict[str, int]]:
    """The iterations ``model``'s shipped calibration was made with (``{"adaround": n, "activations": n}``, as
    `PUBLISHED_ITERS`); None when it ships none (checksums not read)."""
    manifest = shipped_manifest(model)
    return None if manifest is None else {k: int(v) for k, v in manifest["iterations"]["used"].items()}


def shipped_model(model: nn.Module, preset: str) -> nn.Module:
    """The shipped calibration of the static ``preset`` (e.g. ``qdiff-w4a4``) loaded into ``model``."""
    root, manifest = _read(model, preset)
    if preset not in manifest["presets"]:
        raise ValueError(f"the shipped calibration {root} holds presets {sorted(manifest['presets'])}, not "
                         f"{preset!r}; {_how_to_make(model, preset)}")
    return load_quantized(model, root / manifest["presets"][preset])


def shipped_weights(model: nn.Module, config: QuantConfig) -> Path:
    """The shipped weight folder whose AdaRound weights ``config`` can use (same weight quantization)."""
    wanted = weight_only_config(config)
    bits = config.weight.spec.bits if config.weight is not None else 32
    root, manifest = _read(model, f"qdiff-w{bits}a4")
    differences = []
    for relative in manifest["weights"]:
        theirs = weight_only_config(QuantConfig.from_dict(read_manifest(root / relative)["quant_config"]))
        if theirs == wanted:
            return root / relative
        differing = [f"{f.name} {getattr(theirs, f.name)!r} there, {getattr(wanted, f.name)!r} here"
                     for f in fields(QuantConfig) if getattr(theirs, f.name) != getattr(wanted, f.name)]
        differences.append(f"{relative}: {'; '.join(differing)}")
    raise ValueError(f"the shipped calibration {root} holds AdaRound weights of other weight quantizations than "
                     f"this config's ({' | '.join(differences)}); {_how_to_make(model, f'qdiff-w{bits}a4')}")


@register_weight_codes("adaround")
def with_adaround_weights(qmodel: nn.Module, model: nn.Module, config: QuantConfig,
                          weights: Optional[str | Path] = None) -> nn.Module:
    """``qmodel`` (made from ``model``) with AdaRound codes: from ``weights`` (a saved model's folder), or
    the model's shipped ones; its config becomes ``config``."""
    load_weight_codes(qmodel, Path(weights) if weights is not None else shipped_weights(model, config))
    qmodel.quant_config = config
    return qmodel


def _summary(root: Path, weights: list[str], presets: dict[str, str]) -> dict[str, Any]:
    """AdaRound loss ratios per unit, and per preset how its learned step sizes compare with their start (where its
    calibration measured it) and the step-size losses per unit."""
    summary: dict[str, Any] = {"adaround": {}, "activations": {}}
    for relative in weights:
        report = read_manifest(root / relative)["metadata"]["report"]
        units = [{"unit": r["unit"], "layers": r["layers"], "loss_nearest": r["loss_nearest"],
                  "loss_adaround": r["loss_adaround"],
                  "ratio": r["loss_adaround"] / r["loss_nearest"] if r["loss_nearest"] > 0 else None,
                  "flipped": r["flipped"], "seconds": r["seconds"]} for r in report.get("weights", [])]
        summary["adaround"][relative] = {**report.get("adaround_vs_nearest", {}),
                                         "seconds": report["seconds_weights"], "per_unit": units}
    for preset, relative in presets.items():
        report = read_manifest(root / relative)["metadata"]["report"]
        summary["activations"][preset] = {**report.get("learned_vs_start", {}), "seconds": report["seconds_activations"],
                                          "per_unit": report.get("activations", [])}
    return summary


def write_shipped_manifest(root: Path, model_name: str, settings: dict[str, Any], commands: Sequence[str]) -> Path:
    """Write ``root/summary.json`` and then ``root/manifest.json`` (checksums of every file but the
    calibration data) for the saved models under ``root/quantized``; ``commands``: every command that
    calibrated into it, in order (presets may be added later with the same settings)."""
    quantized = root / "quantized"
    weights = sorted(p.parent.relative_to(root).as_posix() for p in quantized.glob("weights/*/manifest.json"))
    presets = {p.parent.name: p.parent.relative_to(root).as_posix() for p in sorted(quantized.glob("*/manifest.json"))
               if p.parent.name != "weights"}
    write_json(_summary(root, weights, presets), root / "summary.json")
    files = sorted(p for p in [*quantized.rglob("*"), root / "summary.json"] if p.is_file())
    used = {"adaround": settings["recipe"]["weights"]["iters"] if settings["recipe"]["weights"] else None,
            "activations": settings["recipe"]["activations"]["iters"]}
    manifest = {"kind": KIND, "model": model_name, "presets": presets, "weights": weights,
                "iterations": {"used": used, "published": PUBLISHED_ITERS}, "settings": settings,
                "commands": list(commands), "environment": environment(),
                "files": {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in files}}
    write_json(manifest, root / "manifest.json")
    return root
