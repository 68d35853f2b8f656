"""benchmarks/bench_generate_host.py profiles `generate` around a free network: every labelled function is
found in the profile, the run's seconds bound each part, bad arguments refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_generate_host = pytest.importorskip("bench_generate_host")


def test_every_labelled_function_is_timed_within_the_run(tmp_path: Path) -> None:
    seconds = bench_generate_host.profile_run(seeds=6, batch_size=4, steps=2, folder=tmp_path)
    assert set(seconds) == {"run", *bench_generate_host.FUNCTIONS.values()}
    assert all(0 < value <= seconds["run"] + 1e-3 for value in seconds.values())
    assert len(list((tmp_path / "timed" / "samples").glob("*.png"))) == 6


def test_bad_arguments_are_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_generate_host.py", "--batch-size", "0"])
    with pytest.raises(SystemExit):
        bench_generate_host.main()
    assert "must be >= 1" in capsys.readouterr().err
