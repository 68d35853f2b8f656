"""Artifacts written by the code before the issue-21 layout (main at ab6644d) load and reproduce bit for bit.

`tests/fixtures/before_issue21/make.py` wrote them with that code: a calibrated Q-Diff+MoDiff W4A4 model
saved by `save_quantized`, a recording saved by `record(..., out_dir=...)`, and the samples of the
calibrated and of the dynamic W4A4 MoDiff model of the tiny test UNet.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import modiff as md
from modiff.quant import load_quantized, presets, quantize
from modiff.record import Quantiles, Stats, load_recording, record

OLD = Path(__file__).parent / "fixtures" / "before_issue21"


def _sample(model: md.Denoiser) -> torch.Tensor:
    x_T, ts = md.noise(range(2), model.sample_shape), md.timesteps(4)
    with md.trajectory(model):
        return md.sample_ddim(model, x_T, ts)


def test_a_saved_quantized_model_loads_and_samples_as_before(tiny_denoiser: md.Denoiser) -> None:
    outputs = load_file(str(OLD / "outputs.safetensors"))
    loaded = load_quantized(tiny_denoiser, OLD / "quantized")
    assert loaded.quant_config == presets["qdiff-w4a4-modiff"]
    torch.testing.assert_close(_sample(loaded), outputs["qdiff_w4a4_modiff"], rtol=0, atol=0)
    torch.testing.assert_close(_sample(quantize(tiny_denoiser, presets["w4a4-modiff"])), outputs["w4a4_modiff"],
                               rtol=0, atol=0)


def test_an_old_recording_loads_and_equals_a_new_one(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    old = load_recording(OLD / "recording")
    assert old.manifest["engine"] == "reference" and len(old.stats) > 0
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(4)
    with record(tiny_denoiser, "net.mid.*", [Stats(), Quantiles()], out_dir=tmp_path / "new", engine="reference") as rec:
        md.sample_ddim(tiny_denoiser, x_T, ts, callback=rec.on_step)
    new = load_recording(tmp_path / "new")
    assert (tmp_path / "new" / "stats.csv").read_text() == (OLD / "recording" / "stats.csv").read_text()
    assert new.manifest["sites"] == old.manifest["sites"]
