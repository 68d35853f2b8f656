"""benchmarks/bench_real_gemm.py's choice of per-shape tilings from its own rows (the GEMM itself needs CUDA)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_real_gemm = pytest.importorskip("bench_real_gemm")


def _row(key: str, candidate, us: float) -> dict:
    return {"key": key, "candidate": candidate, "tiling": "default" if candidate is None else str(candidate), "us": us}


def test_a_tiling_is_chosen_only_where_it_beats_the_heuristic_by_the_margin() -> None:
    fast, slow = [128, 128, 128, 8, 3], [64, 128, 128, 4, 4]
    int8, fp8, small = "int8 taps9 c128 n128 m2^19", "fp8 taps9 c128 n128 m2^19", "int8 taps9 c64 n64 m2^19"
    rows = [_row(int8, None, 500.0), _row(int8, fast, 250.0), _row(int8, slow, 300.0),
            _row(fp8, None, 300.0), _row(fp8, fast, 280.0),  # 7%: timing noise
            _row(small, None, 200.0), {"key": small, "candidate": fast, "error": "smem"},
            {"shape": "cifar", "kernel": "cudnn bf16", "us": 200.0}]
    assert bench_real_gemm.choose_tilings(rows) == {int8: fast}
    assert bench_real_gemm.choose_tilings(rows, margin=0.05) == {int8: fast, fp8: fast}
