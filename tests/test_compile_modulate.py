"""benchmarks/compile_modulate.py: the modulation kernels compiled for sm_90a without a GPU, and the one-pass kernel's
barrier read from its PTX (merges, then the arrival's release, then the acquire wait)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_modulate.py"
sys.path.insert(0, str(SCRIPT.parent))
compile_modulate = pytest.importorskip("compile_modulate")
pytest.importorskip("triton")

MERGE = "@%p1 atom.global.gpu.acq_rel.max.s32 %r1, [ %rd1 + 0 ], %r2;"
RELEASE = "@%p2 atom.global.gpu.release.add.u32 %r3, [ %rd2 + 0 ], %r4;"
ACQUIRE = "@%p2 ld.global.gpu.acquire.b32 %r5, [ %rd2 + 0 ];"


@pytest.mark.parametrize("lines, in_order", [
    ([MERGE, MERGE, RELEASE, ACQUIRE, ACQUIRE], True),
    ([MERGE, ACQUIRE, RELEASE], False),  # waits before it arrives
    ([RELEASE, MERGE, ACQUIRE], False),  # arrives before its range is merged
    ([MERGE, ACQUIRE], False),  # never arrives
])
def test_barrier_order_reads_the_ptx(lines: list[str], in_order: bool) -> None:
    assert compile_modulate.barrier_order("\n".join(lines))["barrier_in_order"] is in_order


@pytest.mark.slow
def test_one_pass_kernel_compiles_with_its_barrier_in_order(tmp_path: Path) -> None:
    """Every state dtype, with and without a split: the merges precede the release, which precedes the wait. In a
    process of its own: the tests' Triton interpreter (TRITON_INTERPRET) has no compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env, check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    one_pass = [r for r in rows if r["kernel"] == "one_pass_kernel"]
    assert len(rows) == 12 and len(one_pass) == 4 and all(r["registers"] > 0 for r in rows)
    assert all(r["barrier_in_order"] and r["release_atomics"] == 1 for r in one_pass)
    assert {r["merge_atomics_before_release"] for r in one_pass} == {6, 12}  # 3 or 6 float maxima, 2 atomics each
