"""An interrupted calibration keeps its finished units and resumes (issue 23): bit for bit the result of
an uninterrupted run, for AdaRound, learned step sizes and residual (MoDiff) step sizes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modiff as md
import modiff.quant.ptq.lsq as lsq
import modiff.quant.ptq.reconstruct as reconstruct
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate
from modiff.quant.ptq.data import CalibDataConfig, collect_calib_data
from modiff.quant.ptq.lsq import ActCalibConfig

RECIPE = CalibrationConfig(AdaRoundConfig(iters=3, batch_size=4, log_every=3),
                           ActCalibConfig(iters=3, batch_size=4, log_every=3))


@pytest.fixture(scope="module")
def setup():
    from conftest import tiny_net
    from modiff.diffusion.schedules import linear_schedule
    from modiff.models.denoisers import Denoiser

    model = Denoiser(tiny_net(0), linear_schedule(), "tiny", {})
    data = collect_calib_data(model, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=4))
    return model, data


def _state(qmodel) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in md.quant.quant_layers(qmodel).items():
        out[f"{name}.weight_q"] = layer.weight_q
        if layer.act is not None and not layer.act.config.dynamic:
            out.update({f"{name}.scale.{k}": s for k, s in enumerate(layer.act.scales)})
            out.update({f"{name}.zero_point.{k}": z for k, z in enumerate(layer.act.zero_points)})
    return out


def _without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _interrupt(monkeypatch: pytest.MonkeyPatch, module, name: str, after: int) -> None:
    """KeyboardInterrupt on the call `after + 1` of module.name (a unit's capture): `after` units done."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == after + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("preset, module, name, after, units_kept", [
    ("qdiff-w4a8", reconstruct, "capture_unit", 1, 1),  # in AdaRound, after its first unit
    ("qdiff-w4a8", reconstruct, "capture_unit", 20, 20),  # in the step sizes, after AdaRound's 18 units and 2
    ("qdiff-w4a8-modiff", lsq, "_unit_pairs", 2, 20),  # in the residual step sizes, after 18 + 2
], ids=["adaround", "step-sizes", "residual-step-sizes"])
def test_interrupted_calibration_resumes_bit_for_bit(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     preset: str, module, name: str, after: int,
                                                     units_kept: int) -> None:
    model, data = setup
    config = md.presets[preset]
    clean, clean_report = calibrate(model, config, data, RECIPE, progress=False)
    _interrupt(monkeypatch, module, name, after)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, config, data, RECIPE, progress=False, checkpoints=tmp_path / "progress")
    monkeypatch.undo()
    kept = sorted(p.name for p in (tmp_path / "progress").glob("*.safetensors"))
    assert len(kept) == units_kept and (tmp_path / "progress" / "settings.json").is_file()
    resumed, report = calibrate(model, config, data, RECIPE, progress=False, checkpoints=tmp_path / "progress")
    a, b = _state(clean), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for phase in ("weights", "activations"):
        assert _without_seconds(report.get(phase, [])) == _without_seconds(clean_report.get(phase, []))


def test_progress_of_other_settings_is_refused(setup, tmp_path: Path) -> None:
    model, data = setup
    recipe = CalibrationConfig(AdaRoundConfig(iters=2, batch_size=4, log_every=2), ActCalibConfig(learn=False))
    calibrate(model, md.presets["qdiff-w4a8"], data, recipe, progress=False, checkpoints=tmp_path / "p")
    with pytest.raises(ValueError, match=r"other settings \(differing: quant_config\).*new --out"):
        calibrate(model, md.presets["qdiff-w8a8"], data, recipe, progress=False, checkpoints=tmp_path / "p")
