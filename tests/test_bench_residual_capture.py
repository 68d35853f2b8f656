"""benchmarks/bench_residual_capture.py: both capture schedules calibrate the same scales, and a direct preset is refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY, tiny_net
from modiff.pipelines.train import DDIMTrainConfig, export_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_residual_capture")


def _run(monkeypatch: pytest.MonkeyPatch, folder: Path, *options: str) -> None:
    monkeypatch.setattr(sys, "argv", ["bench", "--model", str(folder), "--device", "cpu", "--samples-per-step", "4",
                                      "--calib-steps", "2", "--set", "activations.iters=2",
                                      "--set", "activations.batch_size=4", *options])
    bench.main()


def test_both_schedules_learn_the_same_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "tiny"
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    out = tmp_path / "capture.json"
    _run(monkeypatch, folder, "--out", str(out))
    saved = json.loads(out.read_text())
    assert saved["scales_identical"] is True and saved["samples"] == 8
    assert [len(v) for v in saved["seconds"].values()] == [1, 1]


def test_a_direct_preset_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="not a MoDiff preset"):
        _run(monkeypatch, tmp_path / "unused", "--preset", "qdiff-w8a4")
