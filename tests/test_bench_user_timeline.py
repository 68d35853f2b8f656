"""benchmarks/bench_user_timeline.py times the phases of one `generate` call: each phase once per batch or
once per run, within the call's wall time, the library's functions given back afterwards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import modiff.pipelines.generate as gen
import modiff.quant.kernels.modulate as fused
import modiff.utils.images as images_module
import modiff.utils.rng as rng_module
from modiff.pipelines.generate import SampleConfig
from modiff.utils.rng import SeedStreams
from modiff.utils.runs import write_bytes_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_user_timeline = pytest.importorskip("bench_user_timeline")
DRAWS = "noise draws (x_T; ddpm: every step's too, on the draws-ahead thread)"


def test_every_phase_is_timed_once_per_batch_or_run(tmp_path: Path, tame_denoiser) -> None:
    originals = {label: getattr(owner, name) for label, (owner, name) in bench_user_timeline.PHASES.items()}
    result = bench_user_timeline.timed_call(tame_denoiser, batch=2, batches=3, config=SampleConfig(steps=2),
                                            device=torch.device("cpu"), work=tmp_path)
    assert result["images"] == 6 and result["calls"] == {
        "open the run": 1, DRAWS: 3, "sampling loop, enqueued": 3,
        "batch bookkeeping (waits for the device)": 3, "wait for the PNG writer": 1,
        "close the run (grid, samples.npz, manifest)": 1}
    assert all(0 < s <= result["wall_s"] + 1e-3 for s in result["phases_s"].values())
    assert len(result["writer_backlog_at_each_batch_read"]) == 3
    assert all(0 <= n <= 6 for n in result["writer_backlog_at_each_batch_read"])
    assert {label: getattr(owner, name) for label, (owner, name) in bench_user_timeline.PHASES.items()} == originals
    assert gen.sample is originals["sampling loop, enqueued"] and images_module.write_bytes_atomic is write_bytes_atomic


def test_writer_backlog_counts_files_queued_but_not_written_at_each_read_back() -> None:
    """Batches of 3 read back at t=2.5 and 5.5, files done at t=1..5: 3 - 2 and 6 - 5 files still queued."""
    timeline = bench_user_timeline.Timeline(torch.device("cpu"))
    timeline.file_times, timeline.batch_reads = [1.0, 2.0, 3.0, 4.0, 5.0], [2.5, 5.5]
    assert timeline.writer_backlog(3) == [1, 1]
    timeline.file_times = []
    assert timeline.writer_backlog(3) == [3, 6]


@pytest.mark.parametrize("argv", [["--batches", "0"], ["--png-threads", "0"]])
def test_bad_arguments_are_refused(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_user_timeline.py", *argv])
    with pytest.raises(SystemExit):
        bench_user_timeline.main()
    assert "--png-threads must be >= 1" in capsys.readouterr().err


def test_one_pass_modulation_is_on_for_the_timed_call_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, tame_denoiser) -> None:
    """--one-pass-modulation switches the modulation kernels for the timed call (warm-up and compile included)
    and records it; it needs a quantized preset."""
    seen = []
    monkeypatch.setattr(bench_user_timeline, "benchmark_model", lambda name: tame_denoiser)
    monkeypatch.setattr(bench_user_timeline, "timed_call", lambda *args: seen.append(fused._ONE_PASS) or {})
    out = tmp_path / "timeline.json"
    for flag in ([], ["--one-pass-modulation"]):
        monkeypatch.setattr(sys, "argv", ["bench_user_timeline.py", "--device", "cpu", "--preset", "w8a4-modiff",
                                          *flag, "--out", str(out)])
        bench_user_timeline.main()
        assert json.loads(out.read_text())["one_pass_modulation"] == bool(flag)
    assert seen == [False, True] and not fused._ONE_PASS
    monkeypatch.setattr(sys, "argv", ["bench_user_timeline.py", "--one-pass-modulation"])
    with pytest.raises(SystemExit):
        bench_user_timeline.main()
    assert "needs a quantized preset" in capsys.readouterr().err


def test_ddpm_draws_are_timed_at_every_step(tmp_path: Path, tame_denoiser) -> None:
    """DDPM draws each seed's noise at every step whose t is not 0 (uniform spacing ends at t = 1), besides x_T:
    those draws are host work the user path pays for, so the noise phase counts them, made on the draws-ahead
    thread, and the sampling loop's wait for each."""
    config = SampleConfig(sampler="ddpm", steps=3)
    result = bench_user_timeline.timed_call(tame_denoiser, batch=2, batches=2, config=config,
                                            device=torch.device("cpu"), work=tmp_path)
    assert result["images"] == 4 and result["calls"]["sampling loop, enqueued"] == 2
    assert result["calls"][DRAWS] == 2 * (1 + 3)
    assert result["calls"]["wait for a step's noise drawn ahead"] == 2 * 3


def test_png_threads_sets_the_writers_threads_and_gives_the_default_back(tmp_path: Path, tame_denoiser,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--png-threads reaches the PngWriter that `generate` opens, and only inside the timed call."""
    made = []
    original_init = images_module.PngWriter.__init__

    def recording_init(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        made.append(self.threads)

    monkeypatch.setattr(images_module.PngWriter, "__init__", recording_init)
    result = bench_user_timeline.timed_call(tame_denoiser, batch=2, batches=1, config=SampleConfig(steps=2),
                                            device=torch.device("cpu"), work=tmp_path, writer_threads=3)
    assert made == [3, 3] and result["png_threads"] == 3  # the warm-up call's writer and the timed one's
    assert gen.PngWriter is images_module.PngWriter


def test_copied_draws_fill_every_buffer_with_one_fixed_block_and_give_the_draws_back() -> None:
    """The control copies the same normals into every draw, whatever the seed or the call, and only in the block."""
    original = SeedStreams.draw_into
    with bench_user_timeline.copied_draws(True):
        first, second = SeedStreams([0, 1]).randn((5,)), SeedStreams([7, 8]).randn((5,))
        assert torch.equal(first, second) and first.std() > 0.1
    assert SeedStreams.draw_into is original
    drawn = SeedStreams([0, 1]).randn((5,))
    assert not torch.equal(drawn, first) and torch.equal(drawn, SeedStreams([0, 1]).randn((5,)))
    with bench_user_timeline.copied_draws(False):
        assert SeedStreams.draw_into is original


def test_ddpm_with_copied_draws_draws_no_seed_yet_counts_the_same_draws(tmp_path: Path, tame_denoiser,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --copied-draws no seed's generator is drawn (warm-up and timed call), while the calls stay those of DDPM."""
    drawn_rows = []
    real_draw_rows = rng_module._draw_rows
    monkeypatch.setattr(rng_module, "_draw_rows", lambda out, generators: (drawn_rows.append(len(generators)),
                                                                           real_draw_rows(out, generators)))
    original, config = SeedStreams.draw_into, SampleConfig(sampler="ddpm", steps=3)
    result = bench_user_timeline.timed_call(tame_denoiser, batch=2, batches=2, config=config,
                                            device=torch.device("cpu"), work=tmp_path, copy_draws=True)
    assert result["copied_draws"] and result["calls"][DRAWS] == 2 * (1 + 3) and drawn_rows == []
    assert SeedStreams.draw_into is original
    bench_user_timeline.timed_call(tame_denoiser, batch=2, batches=1, config=config, device=torch.device("cpu"),
                                   work=tmp_path)
    assert sum(drawn_rows) == 2 * 2 * (1 + 3)  # warm-up and timed batch, x_T and 3 steps, 2 seeds each
