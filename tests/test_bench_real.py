"""benchmarks/bench_real.py: the teacher-forced per-step error (the timings themselves need CUDA)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import modiff as md
from modiff.quant import presets, quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_real = pytest.importorskip("bench_real")


@pytest.mark.parametrize("preset", [None, "w8a8-int8-modiff-real"])
def test_teacher_forced_on_its_own_trajectory_repeats_the_free_run(tiny_denoiser: md.Denoiser, preset) -> None:
    """Called on the x_t of its own trajectory, with its MoDiff state carried from call to call, a model returns
    the eps of that trajectory bit for bit: the teacher-forced error measures only what differs between models."""
    model = tiny_denoiser if preset is None else quantize(tiny_denoiser, presets[preset])
    cpu = torch.device("cpu")
    eps, inputs = bench_real._eps(model, 2, 5, cpu)
    assert len(inputs) == 5 and [t for _, t in inputs] == sorted((t for _, t in inputs), reverse=True)
    forced = bench_real._eps_teacher_forced(model, inputs, cpu)
    assert all(torch.equal(a, b) for a, b in zip(forced, eps))
    other = bench_real._eps_teacher_forced(quantize(tiny_denoiser, presets["w8a4-modiff"]), inputs, cpu)
    assert max(bench_real._relative(other, eps)) > 0


def test_error_formats_name_simulators_with_real_twins() -> None:
    """Each format of the error run is a simulated MoDiff preset whose "-real" twin runs the same numerics."""
    assert set(bench_real.ERROR_FORMATS) == {"int8", "fp8", "w4a8"}
    for simulated in bench_real.ERROR_FORMATS.values():
        real = presets[f"{simulated}-real"]
        assert real.backend == "real" and real.mode == "modulated" and real.simulated() == presets[simulated]
