"""benchmarks/bench_seed_draws.py times one step's per-seed draws per batch size and thread count, the first
count the base of the speed-ups; bad arguments refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_seed_draws = pytest.importorskip("bench_seed_draws")


def test_a_row_per_batch_size_and_thread_count_with_the_first_count_as_base() -> None:
    rows = bench_seed_draws.measure([3, 600], [1, 3], (2, 2), rounds=2)
    assert [(r["batch"], r["threads"]) for r in rows] == [(3, 1), (3, 3), (600, 1), (600, 3)]
    assert rows[0]["speedup"] == rows[2]["speedup"] == 1.0 and all(r["ms"] > 0 for r in rows)


@pytest.mark.parametrize("argv", [["--threads", "1,0"], ["--shape", "1,0,4"], ["--rounds", "0"]])
def test_bad_arguments_are_refused(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_seed_draws.py", *argv])
    with pytest.raises(SystemExit):
        bench_seed_draws.main()
    assert "must all be >= 1" in capsys.readouterr().err


def test_results_are_written_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "draws.json"
    monkeypatch.setattr(sys, "argv", ["bench_seed_draws.py", "--batch-sizes", "2", "--threads", "1", "--shape", "3",
                                      "--rounds", "1", "--out", str(out)])
    bench_seed_draws.main()
    assert '"batch": 2' in out.read_text()
