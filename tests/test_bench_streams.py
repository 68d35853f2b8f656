"""benchmarks/bench_streams.py: its layouts are parsed or refused before any CUDA work."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_streams  # noqa: E402  (benchmarks/ is not a package)


def test_layouts_are_streams_by_batch() -> None:
    assert bench_streams.parse_layout("2x512") == (2, 512)
    assert bench_streams.parse_layout(" 1X1024") == (1, 1024)


@pytest.mark.parametrize("text", ["2x", "x512", "0x512", "2x0", "2x-4", "2x512x1", "two x 512", "2*512"])
def test_bad_layouts_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="STREAMSxBATCH"):
        bench_streams.parse_layout(text)


def test_a_bad_layout_stops_the_script_before_the_device_is_asked(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_streams.py", "--layouts", "1x1024,2x"])
    with pytest.raises(SystemExit) as stop:
        bench_streams.main()
    assert stop.value.code == 2 and "STREAMSxBATCH" in capsys.readouterr().err
