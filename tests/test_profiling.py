"""benchmarks/profiling.py's device timing (CUDA only)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
profiling = pytest.importorskip("profiling")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events and graphs need CUDA")


@pytest.mark.parametrize("graph", [False, True])
def test_timed_calls_enter_python_only_when_eager(graph: bool) -> None:
    """With ``graph`` the calls are captured once and replayed, so the host's launch cost is out of the timing."""
    x = torch.randn(1024, 1024, device="cuda")
    calls = []

    def run() -> torch.Tensor:
        calls.append(1)
        return x @ x

    times = profiling.device_us_trials(run, trials=3, repeats=4, warmup=2, graph=graph)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(calls) == 2 + (4 if graph else 3 * 4)  # warm-up, then the capture once or every timed call
