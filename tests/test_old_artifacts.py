"""Artifacts written by the code before the issue-21 layout (main at ab6644d) load and reproduce.

Not bit for bit: the fixture was written on another CPU, and float32 convolutions sum in another order
with other vector units (a 2e-5 difference after 4 quantized steps on an AMD EPYC against the machine
that wrote it), and a 4-bit network amplifies it over the steps (up to 7e-4 where a value crosses a
rounding tie). So: relative L2 distance below 1e-3 and no output off by more than 1e-2; a change of a
quantizer's formula moves the outputs by far more. A recorded high quantile moves by up to 4e-4 relative
(the element at its rank changes), so the statistics agree to 1e-3.

`tests/fixtures/before_issue21/make.py` wrote them with that code: a calibrated Q-Diff+MoDiff W4A4 model
saved by `save_quantized`, a recording saved by `record(..., out_dir=...)`, and the samples of the
calibrated and of the dynamic W4A4 MoDiff model of the tiny test UNet.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
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


def _assert_equal_but_for_ties(new: torch.Tensor, old: torch.Tensor) -> None:
    gap = (new - old).abs()
    assert gap.max() <= 1e-2, f"largest difference {gap.max():.3g}"
    assert (new - old).norm() <= 1e-3 * old.norm(), f"relative L2 {(new - old).norm() / old.norm():.3g}"


def test_a_saved_quantized_model_loads_and_samples_as_before(tiny_denoiser: md.Denoiser) -> None:
    outputs = load_file(str(OLD / "outputs.safetensors"))
    loaded = load_quantized(tiny_denoiser, OLD / "quantized")
    assert loaded.quant_config == presets["qdiff-w4a4-modiff"]
    _assert_equal_but_for_ties(_sample(loaded), outputs["qdiff_w4a4_modiff"])
    _assert_equal_but_for_ties(_sample(quantize(tiny_denoiser, presets["w4a4-modiff"])), outputs["w4a4_modiff"])


def test_an_old_recording_loads_and_equals_a_new_one(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    old = load_recording(OLD / "recording")
    assert old.manifest["engine"] == "reference" and len(old.stats) > 0
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(4)
    with record(tiny_denoiser, "net.mid.*", [Stats(), Quantiles()], out_dir=tmp_path / "new", engine="reference") as rec:
        md.sample_ddim(tiny_denoiser, x_T, ts, callback=rec.on_step)
    new = load_recording(tmp_path / "new")
    new_stats, old_stats = (pd.read_csv(p / "stats.csv") for p in (tmp_path / "new", OLD / "recording"))
    pd.testing.assert_frame_equal(new_stats, old_stats, check_exact=False, rtol=1e-3, atol=1e-4)
    assert new.manifest["sites"] == old.manifest["sites"]
