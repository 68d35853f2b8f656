"""benchmarks/bench_real_layers.py: the capture of the real layers' calls, the per-step totals and the tiling
choice from its rows (the timings themselves need CUDA)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_real_layers = pytest.importorskip("bench_real_layers")


@pytest.mark.parametrize("fmt", ["int8", "w4a8"])
def test_capture_takes_every_real_layer_once_from_the_modulated_step(fmt: str) -> None:
    calls = bench_real_layers.capture("fmnist-ddim", fmt, 2, torch.device("cpu"))
    names = [c.name for c in calls]
    assert len(names) == len(set(names)) == 113  # every Conv2d and Linear of the UNet, each called once per step
    for call in calls:
        assert call.x.shape == call.a_hat.shape and call.x.shape[0] == 2
        assert not torch.equal(call.x.float(), call.a_hat.float())  # a_hat is the warm-up step's input: x and t changed
        assert (call.layer.weight_offset_n is not None) == (fmt == "w4a8")  # 4-bit weights come nibble-packed


def _row(kind: str, key: str, gemm: float, candidates: dict) -> dict:
    return {"kind": kind, "key": key, "fp_us": 10.0, "quantize_us": 5.0, "gemm_us": gemm, "op_us": gemm + 5.0,
            "candidates": candidates}


def test_totals_sum_a_step_and_tilings_are_chosen_on_the_summed_time_of_a_key() -> None:
    fast, slow = "[128, 128, 128, 8, 3]", "[64, 128, 128, 4, 4]"
    rows = [_row("conv3x3", "a", 100.0, {fast: 70.0, slow: 120.0}),
            _row("conv3x3", "a", 100.0, {fast: 100.0, slow: 120.0}),  # summed: 170 against 200, 15% faster
            _row("conv1x1", "b", 50.0, {fast: 47.0, slow: "error: smem"}),  # 6%: timing noise
            _row("linear", "c", 20.0, {fast: 10.0, slow: "error: smem"})]
    sums = bench_real_layers.totals(rows)
    assert sums["all"] == {"fp_us": 40.0, "quantize_us": 20.0, "gemm_us": 270.0, "op_us": 290.0}
    assert sums["conv3x3"]["layers"] == 2 and sums["conv3x3"]["gemm_us"] == 200.0
    assert bench_real_layers.better_tilings(rows) == {"a": [128, 128, 128, 8, 3], "c": [128, 128, 128, 8, 3]}


def test_traffic_and_floors_by_hand() -> None:
    """fmnist-ddim's conv_in (1 -> 64 channels, 3x3, 32x32) at batch 512: bytes and MACs of one step as counted by
    hand, and its floors at the H200's peaks; state 0 is direct W8A8 (no a_hat, no o_hat)."""
    call = next(c for c in bench_real_layers.capture("fmnist-ddim", "int8", 1, torch.device("cpu")) if c.name == "net.conv_in")
    n_in, n_out = 512 * 32 * 32, 512 * 64 * 32 * 32
    assert bench_real_layers.traffic(call, 512, 4) == {
        "range_bytes": n_in * 6, "quantize_bytes": n_in * 11, "gemm_bytes": n_in + n_out * 10,
        "fp_bytes": 2 * (n_in + n_out), "macs": n_out * 9}
    direct = bench_real_layers.traffic(call, 512, 0)
    assert (direct["quantize_bytes"], direct["gemm_bytes"]) == (n_in * 3, n_in + n_out * 2)
    peaks = {"bytes_per_s": 1e12, "int8_ops_per_s": 2e12, "bf16_flops_per_s": 1e12}
    assert bench_real_layers.floors([call], 512, 4, peaks) == {
        "quantize_memory_ms": round(n_in * 17 / 1e9, 2), "gemm_memory_ms": round((n_in + n_out * 10) / 1e9, 2),
        "gemm_int8_compute_ms": round(n_out * 9 / 1e9, 2), "fp_memory_ms": round(2 * (n_in + n_out) / 1e9, 2),
        "fp_bf16_compute_ms": round(2 * n_out * 9 / 1e9, 2)}


def test_floors_run_without_cuda_and_timings_refuse_it(monkeypatch, capsys) -> None:
    """--floors prints the three designs' floors on any machine; the timed benchmark exits with a message."""
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_real_layers.py", "--arch", "fmnist-ddim", "--batch", "8", "--floors"])
    bench_real_layers.main()
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(bench_real_layers.STATES)
    assert printed["MoDiff, float32 state"]["quantize_memory_ms"] > printed["direct (no state)"]["quantize_memory_ms"]
    monkeypatch.setattr(sys, "argv", ["bench_real_layers.py", "--arch", "fmnist-ddim"])
    with pytest.raises(SystemExit, match="needs CUDA"):
        bench_real_layers.main()


def test_bench_real_refuses_unknown_fid_runs(monkeypatch, capsys) -> None:
    bench_real = pytest.importorskip("bench_real")
    monkeypatch.setattr(sys, "argv", ["bench_real.py", "--variants", "none", "--fid-runs", "fp,bogus"])
    with pytest.raises(SystemExit):
        bench_real.main()
    assert "unknown --fid-runs ['bogus']" in capsys.readouterr().err
    assert ("sim-int8-modiff-fp32", "fp-fp32") in bench_real.FID_PAIRS and bench_real.FID_RUNS["fp-fp32"] == (None, "fp32")


def test_merged_tilings_keep_the_table_and_record_the_run(tmp_path: Path) -> None:
    table = tmp_path / "gemm_tilings.json"
    table.write_text(json.dumps({"measured": {"device": "H200"}, "tilings": {"old": [64, 128, 128, 4, 4]},
                                 "measured_layers": [{"device": "H200", "format": "int8"}]}))
    rows = [_row("conv3x3", "new", 100.0, {"[128, 128, 128, 8, 3]": 70.0}), _row("conv3x3", "old", 100.0, {})]
    run = {"device": "H100", "arch": "cifar10", "format": "w4a8", "batch": 512}
    bench_real_layers.merge_tilings(table, rows, run)
    merged = json.loads(table.read_text())
    assert merged["tilings"] == {"old": [64, 128, 128, 4, 4], "new": [128, 128, 128, 8, 3]}
    assert merged["measured"] == {"device": "H200"}
    assert merged["measured_layers"] == [{"device": "H200", "format": "int8"}, {
        **run, "margin": bench_real_layers.MARGIN, "by": "benchmarks/bench_real_layers.py"}]
    assert [p.name for p in tmp_path.iterdir()] == ["gemm_tilings.json"]  # no temporary file left beside it


@pytest.mark.parametrize("text", ["not json", '{"measured": {}}', "[1, 2]"])
def test_a_file_that_is_not_a_tilings_table_is_refused_and_left_as_it_was(text: str, tmp_path: Path) -> None:
    path = tmp_path / "gemm_tilings.json"
    path.write_text(text)
    with pytest.raises(SystemExit, match="is not a tilings table.*name a new file"):
        bench_real_layers.merge_tilings(path, [], {"device": "H100"})
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["gemm_tilings.json"]
