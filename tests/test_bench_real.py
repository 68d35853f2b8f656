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


def test_unknown_error_formats_are_refused(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_real.py", "--variants", "none", "--error-formats", "int8,int4"])
    with pytest.raises(SystemExit):
        bench_real.main()
    assert "unknown --error-formats ['int4']; known: int8, fp8, w4a8" in capsys.readouterr().err


def test_an_error_run_stopped_midway_keeps_the_formats_it_finished(tiny_denoiser: md.Denoiser, monkeypatch,
                                                                  tmp_path: Path) -> None:
    """The JSON is rewritten after each format and state: a run killed in the second format (here by a
    KeyboardInterrupt, which the per-format try/except does not catch) leaves the first one's results on disk."""
    import copy
    import json

    monkeypatch.setattr(bench_real, "benchmark_model", lambda arch: copy.deepcopy(tiny_denoiser))
    quantized = bench_real._quantized

    def stop_at_int8(arch: str, preset: str, state_dtype: str = "auto") -> md.Denoiser:
        if preset.startswith("w8a8-int8"):
            raise KeyboardInterrupt
        return quantized(arch, preset, state_dtype)

    monkeypatch.setattr(bench_real, "_quantized", stop_at_int8)
    out = tmp_path / "errors.json"
    monkeypatch.setattr(sys, "argv", ["bench_real.py", "--device", "cpu", "--variants", "none", "--error-batch", "1",
                                      "--steps", "2", "--error-formats", "w4a8,int8", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        bench_real.main()
    errors = json.loads(out.read_text())["errors"]
    assert sorted(errors) == ["batch", "steps", "w4a8-state-bfloat16", "w4a8-state-float32"]
    forced = errors["w4a8-state-float32"]["teacher_forced_real_vs_sim"]
    assert len(forced["per_step"]) == 2 and forced["max"] == 0.0  # on the CPU the real preset runs the simulator
