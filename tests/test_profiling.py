"""benchmarks/profiling.py: the kernel table of the steps after a warm-up, and device timing (CUDA only)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
profiling = pytest.importorskip("profiling")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events and graphs need CUDA")


def test_kernel_table_leaves_out_the_steps_it_skips() -> None:
    """A run of three steps, the first unlike the others: with skip_steps=1 the table covers steps 2 and 3 and
    says so; a run with no step left after the skipped ones is refused."""
    a = torch.randn(64, 64)

    def run(after_step) -> None:
        torch.linalg.inv(a)  # the "warm-up" step's own operator
        after_step()
        for _ in range(2):
            torch.mm(a, a)
            after_step()

    table = profiling.kernel_table(run, torch.device("cpu"), skip_steps=1)
    assert table.startswith("steps profiled: 2 (the first 1 skipped)")
    assert "aten::mm" in table and "linalg_inv" not in table
    assert "linalg_inv" in profiling.kernel_table(lambda: run(lambda: None), torch.device("cpu"))
    with pytest.raises(ValueError, match="took 1 steps: nothing is left after skipping 1"):
        profiling.kernel_table(lambda after_step: after_step(), torch.device("cpu"), skip_steps=1)
    assert not torch._C._autograd._profiler_enabled()  # stopped, also when refused (a running one crashed the exit)


@needs_cuda
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
