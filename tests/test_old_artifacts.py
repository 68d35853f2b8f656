"""Artifacts written by the code before the issue-21 layout (main at ab6644d) load and reproduce.

The saved model is compared teacher-forced and in float64: each step's input x_t of the old code's trajectory
goes into the current code's model, whose eps must equal the old one's. Float32 samples could not be compared
across machines: the fixture's were written on another CPU, and on an AVX2 AMD EPYC the same old code's samples
differed by up to 1.5, a value crossing a 4-bit rounding tie early and the trajectory moving away
(fixtures/before_issue21/make_teacher_forced.py measures it); in float64 no value crossed a tie under
perturbations larger than a different summation order, so the outputs agree to 1e-9, and a change of a
quantizer's formula moves them by far more. A recorded high quantile moves by up to 4e-4 relative (the element
at its rank changes), so the statistics agree to 1e-3.

`tests/fixtures/before_issue21/make.py` wrote the saved calibrated Q-Diff+MoDiff W4A4 model (`save_quantized`)
and the recording (`record(..., out_dir=...)`) with that code, and `make_teacher_forced.py` the trajectories of
the calibrated and of the dynamic W4A4 MoDiff model of the tiny test UNet.
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


def _teacher_forced(model: torch.nn.Module, old: dict[str, torch.Tensor], name: str) -> None:
    """The float64 model's eps at each step of the old trajectory equals the old code's."""
    model = model.double()
    with md.trajectory(model), torch.no_grad():
        for step, t in enumerate(old["timesteps"].tolist()):
            x_t = old[f"{name}.x_t"][step]
            eps = model(x_t, torch.full((len(x_t),), t))
            torch.testing.assert_close(eps, old[f"{name}.eps"][step], rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"{name}, step {step} (t = {t}): {m}")


def test_a_saved_quantized_model_loads_and_samples_as_before(tiny_denoiser: md.Denoiser) -> None:
    old = load_file(str(OLD / "teacher_forced.safetensors"))
    loaded = load_quantized(tiny_denoiser, OLD / "quantized")
    assert loaded.quant_config == presets["qdiff-w4a4-modiff"]
    _teacher_forced(loaded, old, "qdiff_w4a4_modiff")
    _teacher_forced(quantize(tiny_denoiser, presets["w4a4-modiff"]), old, "w4a4_modiff")


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
