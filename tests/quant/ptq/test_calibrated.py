"""Calibrate once, reuse: static presets are calibrated into a folder the first time and loaded after."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modiff as md
from modiff.quant.ptq import reuse as calibrated
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.data import CalibDataConfig
from modiff.quant.ptq.calibrate import CalibrationConfig
from modiff.quant.ptq.reuse import Calibration, quantized_model
from modiff.quant.ptq.lsq import ActCalibConfig

TINY = Calibration(
    CalibDataConfig(steps=4, calib_steps=2, samples_per_step=4, batch_size=4),
    CalibrationConfig(AdaRoundConfig(iters=2, batch_size=4, log_every=2), ActCalibConfig(iters=2, batch_size=4, log_every=2),
                      capture_batch=4),
)
X, T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])


def test_static_preset_is_calibrated_once_then_loaded(tiny_denoiser: md.Denoiser, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first = quantized_model(tiny_denoiser, "qdiff-w8a8", tmp_path, TINY)
    assert (tmp_path / "calib-data" / "manifest.json").is_file()
    assert (tmp_path / "quantized" / "qdiff-w8a8" / "manifest.json").is_file()

    def no_calibration(*args, **kwargs):
        raise AssertionError("a saved model must be reused, not calibrated again")

    monkeypatch.setattr(calibrated, "calibrate", no_calibration)
    again = quantized_model(tiny_denoiser, "qdiff-w8a8", tmp_path, TINY)
    assert torch.equal(first(X, T), again(X, T))
    assert not torch.equal(first(X, T), tiny_denoiser(X, T))


def test_other_settings_are_refused_not_reused(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    quantized_model(tiny_denoiser, "qdiff-w8a8", tmp_path, TINY)
    other = Calibration(TINY.data, CalibrationConfig(AdaRoundConfig(iters=3, batch_size=4), TINY.recipe.activations,
                                                     capture_batch=4))
    with pytest.raises(ValueError, match="other calibration settings"):
        quantized_model(tiny_denoiser, "qdiff-w8a8", tmp_path, other)


def test_static_preset_without_settings_says_how(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modiff calibrate-data"):
        quantized_model(tiny_denoiser, "qdiff-w4a4-modiff", tmp_path)
    assert not (tmp_path / "quantized").exists()


def test_dynamic_preset_is_plain_quantize(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    q = quantized_model(tiny_denoiser, "w8a8", tmp_path, TINY)
    assert torch.equal(q(X, T), md.quantize(tiny_denoiser, md.presets["w8a8"])(X, T))
    assert not any(tmp_path.iterdir())


def test_presets_with_the_same_weights_share_one_adaround(tiny_denoiser: md.Denoiser, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """qdiff-w8a8 and qdiff-w8a4-modiff quantize weights alike: AdaRound runs once and both models hold
    the same weight codes; another weight bit width gets its own."""
    runs = []
    original = calibrated.calibrate_weights
    monkeypatch.setattr(calibrated, "calibrate_weights", lambda *a, **k: runs.append(a[1]) or original(*a, **k))
    direct = quantized_model(tiny_denoiser, "qdiff-w8a8", tmp_path, TINY)
    modulated = quantized_model(tiny_denoiser, "qdiff-w8a4-modiff", tmp_path, TINY)
    assert len(runs) == 1 and len(list((tmp_path / "quantized" / "weights").iterdir())) == 1
    direct_layers, modulated_layers = md.quant.quant_layers(direct), md.quant.quant_layers(modulated)
    for name, layer in direct_layers.items():
        assert torch.equal(layer.weight_codes(), modulated_layers[name].weight_codes())
    quantized_model(tiny_denoiser, "qdiff-w4a8", tmp_path, TINY)
    assert len(runs) == 2
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "quantized" / "weights").iterdir()) == ["w4", "w8"]
