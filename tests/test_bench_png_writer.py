"""benchmarks/bench_png_writer.py times one batch of PNGs per thread count: every file written, the first
count the base of the speed-ups, bad arguments refused."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import modiff.utils.images as images_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_png_writer = pytest.importorskip("bench_png_writer")


def test_rows_per_thread_count_with_the_first_as_base() -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    rows = bench_png_writer.measure(images, [1, 3], repeats=2)
    assert [r["threads"] for r in rows] == [1, 3] and rows[0]["speedup"] == 1.0
    assert all(r["seconds"] > 0 and r["files_per_s"] > 0 for r in rows)


def test_bad_arguments_are_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_png_writer.py", "--threads", "1,0"])
    with pytest.raises(SystemExit):
        bench_png_writer.main()
    assert "must be >= 1" in capsys.readouterr().err


def test_encoding_time_is_per_image() -> None:
    images = np.zeros((4, 32, 32, 1), dtype=np.uint8)
    assert 0 < bench_png_writer.encode_ms_per_file(images) < 1e3


def test_threaded_writer_writes_every_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    monkeypatch.setattr(images_module, "write_bytes_atomic", lambda path, data: written.append(path.name))
    images = np.zeros((300, 4, 4, 1), dtype=np.uint8)  # two parts of at least PngWriter's 128 files
    assert bench_png_writer.tail_seconds(images, threads=3) > 0
    assert sorted(written) == [f"{i:06d}.png" for i in range(300)]
