"""Calibrate once, reuse: the quantized model a preset names, with static presets calibrated into a folder.

`quantized_model(model, preset, folder, calibration)` returns `quantize(model, presets[preset])` for
dynamic presets. For static ones (``qdiff-*``) it collects calibration data from ``model`` into
``folder/calib-data`` and calibrates into ``folder/quantized/<preset>`` the first time, and loads them
afterwards, so experiment drivers and notebooks can re-run without repeating hours of GPU work. A folder
made with other settings is refused rather than silently reused.

AdaRound weights are the expensive part and depend only on the weight quantization, so they are saved
once into ``folder/quantized/weights/w<bits>-<hash of their settings>`` and shared: the ten presets
qdiff-w4a{8,6,4,3,2}[-modiff] run one AdaRound, not ten, and their folders read the weight codes from
there (`save_quantized(..., weights_from=...)`). Dynamic presets with AdaRound weights
(``w4a4-adaround-modiff``) take the same weights when ``calibration`` is given, and the model's shipped
ones (`modiff.quant.ptq.shipped`) otherwise; without ``calibration``, a static preset comes from the model's
shipped calibration when it has one.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

from modiff.utils.distributed import World
from modiff.quant.api import quantize
from modiff.quant.ptq.data import CalibData, CalibDataConfig, collect_and_save, load_calib_data
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate, calibrate_weights, weight_only_config
from modiff.quant.presets import calibration_hint, needs_calibration, presets
from modiff.quant.ptq.saved import load_quantized, read_manifest, save_quantized
from modiff.quant.ptq.shipped import calibration_folder, has_shipped, shipped_model, write_shipped_manifest
from modiff.utils.runs import write_json

__all__ = ["Calibration", "calibration_data", "quantized_model", "calibrate_shipped"]

T = TypeVar("T")
WITHDRAWN_MANIFEST = "manifest.withdrawn.json"  # a shipped manifest while its folder changes


@dataclass(frozen=True)
class Calibration:
    """How static presets are calibrated: the data (steps, samples per step) and the recipe."""

    data: CalibDataConfig = field(default_factory=CalibDataConfig)
    recipe: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"data": asdict(self.data), "recipe": self.recipe.to_dict()}


def _check_same(saved: dict[str, Any], wanted: dict[str, Any], folder: Path) -> None:
    if json.loads(json.dumps(saved)) != json.loads(json.dumps(wanted)):
        raise ValueError(f"{folder} was made with other calibration settings ({saved}); delete it or use "
                         f"another folder for these settings ({wanted})")


def calibration_data(model: nn.Module, folder: Path, calibration: Calibration, device: torch.device) -> CalibData:
    """The calibration data of ``folder`` (collected from ``model`` into folder/calib-data the first time)."""
    data_dir = folder / "calib-data"
    if not (data_dir / "manifest.json").exists():
        collect_and_save(copy.deepcopy(model), calibration.data, data_dir, device,
                         {"model": getattr(model, "name", None)})
    data = load_calib_data(data_dir, device)
    _check_same(asdict(data.config), asdict(calibration.data), data_dir)
    return data


def _weights_folder(preset: str, folder: Path, calibration: Calibration) -> tuple[Path, dict[str, Any]]:
    """Where the weight-only model of ``preset``'s weight quantization is saved in ``folder``, and the
    settings whose hash names it."""
    config = weight_only_config(presets[preset])
    recipe = calibration.recipe
    settings = {"quant_config": config.to_dict(), "data": asdict(calibration.data),
                "weights": None if recipe.weights is None else asdict(recipe.weights),
                "capture_batch": recipe.capture_batch}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    bits = config.weight.spec.bits if config.weight is not None else 32
    return folder / "quantized" / "weights" / f"w{bits}-{digest}", settings


def _shared_weights(model: nn.Module, preset: str, folder: Path, calibration: Calibration,
                    data: Callable[[], CalibData]) -> Path:
    """The folder of the weight-only model for ``preset``'s weight quantization, calibrated once per folder
    and settings (``data`` is called only when it must be)."""
    saved, settings = _weights_folder(preset, folder, calibration)
    if not (saved / "manifest.json").exists():
        weights, report = calibrate_weights(model, weight_only_config(presets[preset]), data(), calibration.recipe,
                                            checkpoints=saved / "progress")
        save_quantized(weights, saved, {"model": getattr(model, "name", None), "settings": settings, "report": report,
                                        "first_used_by": preset})
        shutil.rmtree(saved / "progress")
    _check_same(read_manifest(saved)["metadata"]["settings"], settings, saved)
    return saved


def quantized_model(model: nn.Module, preset: str, folder: str | Path, calibration: Optional[Calibration] = None,
                    device: torch.device | str = "cpu") -> nn.Module:
    """The quantized copy of ``model`` that ``preset`` names (calibrated and cached for static presets)."""
    config = presets[preset]
    folder = Path(folder)
    if not needs_calibration(config):
        if config.adaround and calibration is not None:
            weights = _shared_weights(model, preset, folder, calibration,
                                      lambda: calibration_data(model, folder, calibration, torch.device(device)))
            return quantize(model, config, weights=weights)
        return quantize(model, config)
    saved = folder / "quantized" / preset
    if calibration is None:
        if has_shipped(model, preset):
            return shipped_model(model, preset)
        raise ValueError(f"{calibration_hint(preset)}; or pass calibration=Calibration(...) to calibrate it here")
    settings = {"preset": preset, **calibration.to_dict()}
    if not (saved / "manifest.json").exists():
        data = calibration_data(model, folder, calibration, torch.device(device))
        weights = _shared_weights(model, preset, folder, calibration, lambda: data)
        qmodel, report = calibrate(model, config, data, calibration.recipe, weights=load_quantized(model, weights),
                                   checkpoints=saved / "progress")
        save_quantized(qmodel, saved, {"model": getattr(model, "name", None), "settings": settings, "report": report},
                       weights_from=weights)
        shutil.rmtree(saved / "progress")
    _check_same(read_manifest(saved)["metadata"]["settings"], settings, saved)
    return load_quantized(model, saved)


def calibrate_shipped(model: nn.Module, preset_names: Sequence[str], calibration: Calibration,
                      device: torch.device | str = "cpu", command: str = "") -> Path:
    """Calibrate the static presets into the model folder's ``calibration/`` (AdaRound once per weight
    quantization; presets already there with the same settings are kept) and write its manifest, with
    checksums, ``summary.json`` and every command that calibrated into the folder. The calibration data stays
    in ``calibration/calib-data`` (not shipped).

    Under a process group (``torchrun -m modiff calibrate-shipped``, `modiff.pipelines.distributed.launch`)
    the work is dealt over the ranks: rank 0 collects the calibration data and makes the plan; then the
    AdaRound runs (one per weight quantization, each on a rank of its own where there are enough,
    `first_round`) go beside the presets whose weights are there, then the presets that waited for those runs
    go round robin, each preset into its own folder; rank 0 writes the manifest once every rank is done. The
    weight codes and step sizes are those one process writes on that kind of device (every step reads the data
    and weights from the folder; on the CPU, with as many threads per rank as that process had).
    """
    world = World.current()
    root = calibration_folder(model)
    preset_names = list(dict.fromkeys(preset_names))  # a preset named twice must not go to two ranks
    for name in preset_names:
        if not needs_calibration(presets[name]):
            raise ValueError(f"preset {name!r} needs no calibration data; ship static presets (qdiff-w4a4, "
                             f"qdiff-w4a4-modiff): the dynamic AdaRound presets (w4a4-adaround-modiff) use their weights")
    _check_same_as_shipped(root, calibration)
    device = torch.device(device)
    world.barrier()  # every rank has read the folder before rank 0 changes it
    adaround, ready, waiting = world.from_leader(lambda: _plan(model, preset_names, root, calibration, device))
    commands = world.from_leader(lambda: _withdraw_manifest(root, command))
    data = functools.partial(calibration_data, model, root, calibration, device)
    runs = [functools.partial(_shared_weights, model, name, root, calibration, data) for name in adaround]
    world.run_own(first_round(runs, [_preset_task(model, name, root, calibration, device) for name in ready],
                              world.rank, world.size), _run)
    world.share([_preset_task(model, name, root, calibration, device) for name in waiting], _run)
    settings = {"data": asdict(calibration.data), "recipe": calibration.recipe.to_dict()}
    return world.from_leader(lambda: _publish(root, getattr(model, "name", str(model.folder)), settings, commands))


Task = Callable[[], object]


def _plan(model: nn.Module, preset_names: Sequence[str], root: Path, calibration: Calibration,
          device: torch.device) -> tuple[list[str], list[str], list[str]]:
    """Rank 0's plan of a shipped calibration, one list the ranks share (a rank that looked at the folder
    later would see another): the first preset of each AdaRound run still to do, the presets whose weights
    are there already (calibrated if missing, else loaded), and the presets whose weights those runs make.
    Collects the calibration data when a preset is missing."""
    missing = [name for name in preset_names if not (root / "quantized" / name / "manifest.json").exists()]
    weights_of = {name: _weights_folder(name, root, calibration)[0] for name in preset_names}
    first_users: dict[Path, str] = {}  # each weight folder still to calibrate -> the first preset that needs it
    for name in missing:
        if not (weights_of[name] / "manifest.json").exists():
            first_users.setdefault(weights_of[name], name)
    waiting = [name for name in preset_names if weights_of[name] in first_users]
    if missing:
        calibration_data(model, root, calibration, device)
    return list(first_users.values()), [name for name in preset_names if name not in waiting], waiting


def _preset_task(model: nn.Module, name: str, root: Path, calibration: Calibration, device: torch.device) -> Task:
    return functools.partial(quantized_model, model, name, root, calibration, device)


def first_round(weight_tasks: Sequence[T], ready_tasks: Sequence[T], rank: int, size: int) -> list[T]:
    """The first-round tasks of rank ``rank`` of ``size``: with more ranks than AdaRound runs, each run has a
    rank of its own (one run takes as long as several presets) and the other ranks share the ready presets
    round robin; otherwise all go round robin."""
    runs = len(weight_tasks)
    if size <= runs:
        return [*weight_tasks, *ready_tasks][rank::size]
    return [weight_tasks[rank]] if rank < runs else list(ready_tasks[rank - runs::size - runs])


def _run(task: Task) -> None:
    task()


def _withdraw_manifest(root: Path, command: str) -> list[str]:
    """Move ``root``'s manifest aside while its folder changes (no stale checksums meanwhile), with ``command``
    added to the commands it lists (older manifests: one "command"), and return them: an interrupted
    calibration leaves them aside, so the command that resumes lists them too (one command repeated at once
    is listed once)."""
    manifest, aside = root / "manifest.json", root / WITHDRAWN_MANIFEST
    if manifest.is_file():
        manifest.replace(aside)
    shipped = json.loads(aside.read_text()) if aside.is_file() else {}
    commands = shipped.get("commands", [shipped["command"]] if "command" in shipped else [])
    commands = commands if commands[-1:] == [command] else [*commands, command]
    root.mkdir(parents=True, exist_ok=True)
    write_json({**shipped, "commands": commands}, aside)
    return commands


def _publish(root: Path, model_name: str, settings: dict[str, Any], commands: list[str]) -> Path:
    written = write_shipped_manifest(root, model_name, settings, commands)
    (root / WITHDRAWN_MANIFEST).unlink(missing_ok=True)
    return written


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"spacing": "quad"}}`` -> ``{"data.spacing": "quad"}``, values JSON-normalised."""
    out: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(tree)).items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _check_same_as_shipped(root: Path, calibration: Calibration) -> None:
    """One shipped calibration, one set of settings: its manifest states them once for every preset, so a
    preset calibrated otherwise (another spacing, other iterations) is refused before any work, naming the
    differences. Presets saved by an interrupted run (whose manifest is not written yet) count as well."""
    wanted = _flat(calibration.to_dict())
    for saved in sorted((root / "quantized").glob("*/manifest.json")):
        if saved.parent.name == "weights":
            continue
        theirs = _flat({k: v for k, v in read_manifest(saved.parent)["metadata"]["settings"].items() if k != "preset"})
        differences = [f"{key}: {theirs.get(key)!r} there, {wanted.get(key)!r} here"
                       for key in sorted(set(theirs) | set(wanted)) if theirs.get(key) != wanted.get(key)]
        if differences:
            raise ValueError(f"{root} holds {saved.parent.name} calibrated with other settings ({'; '.join(differences)}); "
                             f"calibrate with the same settings (its manifest's commands say how it was made) or "
                             f"delete {root} to recalibrate every preset")
