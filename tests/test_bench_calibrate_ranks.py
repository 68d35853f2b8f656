"""benchmarks/bench_calibrate_ranks.py: each rank count calibrates its own copy of the model without its shipped
calibration, and on the CPU one rank and two write the same files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import TINY, tiny_net
from modiff.pipelines.train import DDIMTrainConfig, export_weights

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
bench = pytest.importorskip("bench_calibrate_ranks")

TINY_OPTIONS = ["--preset", "qdiff-w4a4", "--preset", "qdiff-w4a4-modiff", "--device", "cpu", "--steps", "4",
                "--calib-steps", "2", "--samples-per-step", "4", "--set", "adaround.iters=3",
                "--set", "adaround.batch_size=4", "--set", "activations.iters=2", "--set", "activations.batch_size=4",
                "--set", "capture_batch=4"]


def test_the_copy_leaves_the_shipped_calibration_behind(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    (folder / "calibration").mkdir()
    (folder / "calibration" / "manifest.json").write_text("{}")
    copy = bench.model_copy(str(folder), tmp_path / "copy")
    assert not (copy / "calibration").exists()
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in folder.iterdir() if p.name != "calibration")


@pytest.mark.slow
def test_one_rank_and_two_make_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without OMP_NUM_THREADS the bench gives every rank one thread, so one rank sums as each of two does."""
    folder = tmp_path / "tiny"
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rows = list(bench.compare_ranks(str(folder), [1, 2], TINY_OPTIONS, tmp_path / "work"))
    assert [r["ranks"] for r in rows] == [1, 2] and rows[0]["speedup"] == 1.0
    assert all(r["identical_to_first"] and r["files"] >= 3 for r in rows)  # W4 weights and two presets' step sizes
    assert not (folder / "calibration").exists()  # the model itself is left as it was


def test_a_failed_calibration_names_the_rank_count(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    with pytest.raises(RuntimeError, match="1 ranks failed"):
        bench.timed_calibration(folder, 1, [*TINY_OPTIONS[:4], "--set", "adaround.no_such_field=1"])


def test_rank_counts_must_be_positive() -> None:
    assert bench._rank_counts("1,5") == [1, 5]
    with pytest.raises(Exception, match="rank counts >= 1"):
        bench._rank_counts("0,2")


def test_out_keeps_the_counts_finished_before_a_later_count_fails(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def calibration(folder: Path, ranks: int, options: list[str]) -> float:
        if ranks == 2:
            raise RuntimeError("2 ranks failed (exit 1)")
        return 4.0

    monkeypatch.setattr(bench, "model_copy", lambda model, into: into)
    monkeypatch.setattr(bench, "timed_calibration", calibration)
    monkeypatch.setattr(bench, "calibration_digests", lambda folder: {"w.safetensors": "ab"})
    out = tmp_path / "ranks.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--model", "tiny", "--device", "cpu", "--ranks", "1,2", "--out", str(out)])
    with pytest.raises(RuntimeError, match="2 ranks failed"):
        bench.main()
    saved = json.loads(out.read_text())
    assert saved["rank_counts"] == [1, 2]
    assert saved["rows"] == [{"ranks": 1, "seconds": 4.0, "speedup": 1.0, "files": 1, "identical_to_first": True}]
