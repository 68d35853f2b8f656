"""benchmarks/bench_sampling.py's user path: images per second and, when asked, the host's profile of the timed call."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modiff.pipelines.execution import ExecutionConfig
from modiff.pipelines.generate import SampleConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
bench_sampling = pytest.importorskip("bench_sampling")


def test_user_path_keeps_the_host_profile_only_when_asked(tame_denoiser, tmp_path: Path) -> None:
    args = (tame_denoiser, ExecutionConfig(precision="fp32"), 2, 2, SampleConfig(steps=2), torch.device("cpu"), tmp_path)
    images_per_s, host = bench_sampling._user(*args, host_rows=5)
    assert images_per_s > 0 and "generate" in host and "cumulative" in host
    assert bench_sampling._user(*args)[1] == ""
    assert list(tmp_path.iterdir()) == []  # the run folders are temporary


def test_negative_host_profile_is_refused() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_sampling.py"), "--device", "cpu", "--variants",
                           "fp32", "--host-profile", "-1"], capture_output=True, text=True, cwd=BENCHMARKS)
    assert done.returncode == 2 and "--host-profile takes a number of rows >= 0" in done.stderr
