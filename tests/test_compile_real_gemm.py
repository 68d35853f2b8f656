"""benchmarks/compile_real_gemm.py: the real GEMM compiled for sm_90a on a machine without a GPU (Triton's compiler
and its bundled ptxas), with the arguments specialized as Triton's JIT specializes a launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_real_gemm.py"
sys.path.insert(0, str(SCRIPT.parent))
compile_real_gemm = pytest.importorskip("compile_real_gemm")
pytest.importorskip("triton")


def test_arguments_are_specialized_as_the_jit_does() -> None:
    """Aligned pointers and integers divisible by 16 get the divisibility hint, integers equal to 1 become constants,
    other integers stay plain i32."""
    aligned = torch.empty(64, dtype=torch.int8)
    offset_view = aligned[1:]  # one byte past a 16-byte boundary
    assert aligned.data_ptr() % 16 == 0
    signature, constants, attrs = compile_real_gemm.specialize(
        ["a", "b", "m", "n", "one", "odd"], [aligned, offset_view, 4096, 48, 1, 7])
    assert signature == {"a": "*i8", "b": "*i8", "m": "i32", "n": "i32", "one": "constexpr", "odd": "i32"}
    assert constants == {"one": 1}
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}


@pytest.mark.slow
def test_4_bit_weight_tiles_are_pipelined_as_the_8_bit_ones(tmp_path: Path) -> None:
    """The W4A8 GEMM compiled for Hopper copies its weight tiles asynchronously, stages ahead, as the INT8 GEMM
    does (sitting 36: computed in the kernel, ceil(C / 2) hid its divisibility and the weights were loaded
    synchronously in every iteration); both run on wgmma. In a process of its own: the tests' Triton interpreter
    (TRITON_INTERPRET) has no compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    subprocess.run([sys.executable, str(SCRIPT), "--shapes", "fmnist", "--formats", "int8,w4a8", "--out", str(out)],
                   env=env, check=True, capture_output=True)
    compiled = {(r["format"], r["epilogue"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(compiled) == 4 and all(r["wgmma"] and r["registers"] > 0 for r in compiled.values())
    for epilogue in ("direct", "modulated"):
        assert compiled["w4a8", epilogue]["async_copies"] == compiled["int8", epilogue]["async_copies"] > 0
        # INT8's operands go to the MMA as loaded; W4A8's widened weight tile, wgmma's second operand, is written
        # to shared memory at every step of K (benchmarks/experiments/w4a8-weights-as-first-operand-sitting39.patch)
        assert [compiled[fmt, epilogue]["register_tiles_to_shared"] for fmt in ("int8", "w4a8")] == [0, 1]


@pytest.mark.parametrize("argv, says", [
    (["--formats", "int4"], "unknown formats ['int4']; known: int8, fp8, w4a8"),
    (["--shapes", "lsun"], "no shape's name contains 'lsun'; the shapes: cifar 32x32 c128"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_bad_arguments_are_refused_before_compiling(argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["compile_real_gemm.py", *argv])
    with pytest.raises(SystemExit):
        compile_real_gemm.main()
    assert says in capsys.readouterr().err


def test_the_interpreter_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(sys, "argv", ["compile_real_gemm.py"])
    with pytest.raises(SystemExit):
        compile_real_gemm.main()
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1 makes Triton's kernels interpreted" in err and "unset it" in err
