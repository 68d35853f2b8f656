"""benchmarks/bench_modulate.py times the modulation step's two kernels against the one-pass kernel, per shape."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_modulate = pytest.importorskip("bench_modulate")
pytest.importorskip("triton")


def test_both_kernels_are_timed_per_shape_with_their_counted_bandwidths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shape times the two kernels and the one-pass kernel (a spy on the launcher sees the switch both ways;
    a stand-in clock gives 0.2 us and 0.1 us), and the bandwidths count 5 and 3 passes of 2 bytes per value."""
    import modiff.quant.kernels.modulate as fused

    modes = []
    launch = fused.launch_modulate
    monkeypatch.setattr(fused, "launch_modulate", lambda *args: modes.append(fused._ONE_PASS) or launch(*args))
    monkeypatch.setattr(bench_modulate, "_timer", lambda device: lambda call: call() or (1e-4 if fused._ONE_PASS else 2e-4))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter runs only without CUDA
    rows = bench_modulate.measure(device, batch=2, shapes=[(3, 4, 4), (2, 2, 2)], repeats=2)
    assert [row["shape"] for row in rows] == [[2, 3, 4, 4], [2, 2, 2, 2]]
    assert [row["values"] for row in rows] == [96, 16]
    assert modes == [False, True] * 6 and not fused._ONE_PASS  # 3 rounds (the first compiles) of both, per shape
    for row in rows:
        assert (row["two kernels ms"], row["one pass ms"], row["one pass / two kernels"]) == (2e-4, 1e-4, 0.5)
    assert [(row["two kernels GB/s over 5 passes"], row["one pass GB/s over 3 passes"]) for row in rows] == [
        (4.8, 5.8), (0.8, 1.0)]  # 10 and 6 bytes per value over 0.2 and 0.1 us


@pytest.mark.parametrize("text", ["64x32", "64x0x32", "axbxc", ""])
def test_bad_shapes_are_refused(text: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_modulate.py", "--device", "cpu", "--shapes", text])
    with pytest.raises(SystemExit):
        bench_modulate.main()
    assert "a shape is CxHxW" in capsys.readouterr().err
