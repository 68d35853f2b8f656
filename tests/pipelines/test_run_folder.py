"""What a run folder guarantees (issue 23): identity first, checked on resume, one writer, every writer
recorded, damaged PNGs made again, non-finite samples refused, a full disk named."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import modiff.utils.images as images_module
from modiff.diffusion.schedules import linear_schedule
from modiff.models.denoisers import Denoiser
from modiff.pipelines.generate import NonFiniteSamplesError, SampleConfig, generate
from modiff.utils.locks import FolderLockedError, folder_lock
from modiff.utils.runs import DiskFullError

from conftest import TameNet, fail_file_write

CONFIG = SampleConfig(steps=3)


def _run(model, seeds, out: Path, config: SampleConfig = CONFIG, **kw) -> Path:
    return generate(model, seeds, out, config, device="cpu", progress=False, **{"batch_size": 4, **kw})


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, pngs: int) -> None:
    """Make the run die (as Ctrl-C or kill would) once `pngs` PNGs are written."""
    real, count = images_module.write_bytes_atomic, []

    def write_then_die(path, data):
        if len(count) == pngs:
            raise KeyboardInterrupt
        count.append(path)
        real(path, data)

    monkeypatch.setattr(images_module, "write_bytes_atomic", write_then_die)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


class BatchCoupled(torch.nn.Module):
    """TameNet plus a term in the batch mean, as a per-tensor (one scale per batch) quantizer couples the
    samples of a batch: an image depends on its batch companions."""

    def __init__(self) -> None:
        super().__init__()
        self.tame = TameNet(0)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.tame.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.tame(x, t) + 0.2 * x.mean()


class NaNBelow(torch.nn.Module):
    """TameNet whose eps is NaN for timesteps below `t_nan` (a broken layer late in sampling)."""

    def __init__(self, t_nan: int) -> None:
        super().__init__()
        self.tame, self.t_nan = TameNet(0), t_nan

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.tame.sample_shape

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.tame(x, t)
        return torch.where((t < self.t_nan).view(-1, 1, 1, 1), torch.full_like(eps, float("nan")), eps)


def test_interrupted_run_refuses_another_config(tmp_path: Path, tame_denoiser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after 3 images, the folder already says how they were made: 10 steps into it is refused."""
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(tame_denoiser, range(8), out, batch_size=2)
    monkeypatch.undo()
    assert len(list((out / "samples").glob("*.png"))) == 3
    assert _manifest(out)["identity"]["sample"]["steps"] == 3
    with pytest.raises(ValueError, match=r"another configuration .*sample\.steps: 3 -> 10"):
        _run(tame_denoiser, range(4), out, SampleConfig(steps=10), batch_size=2)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"{s:06d}.png" for s in range(3)]


def test_resume_with_another_batch_size_is_refused(tmp_path: Path, tame_denoiser) -> None:
    """Adding images with another batch size is refused with the options to finish the run; reading the
    finished run with another batch size (nothing to sample) is fine."""
    out = _run(tame_denoiser, range(4), tmp_path / "run", batch_size=2)
    with pytest.raises(ValueError, match=r"execution\.batch_size: 2 -> 4.*finish it with --batch-size 2"):
        _run(tame_denoiser, range(8), out, batch_size=4)
    assert len(list((out / "samples").glob("*.png"))) == 4
    _run(tame_denoiser, range(4), out, batch_size=4)  # every image there: nothing is mixed
    _run(tame_denoiser, range(8), out, batch_size=2)
    assert _manifest(out)["seeds"] == list(range(8))


def test_resume_keeps_each_seed_in_its_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed half-way through writing a batch, the resumed run samples that batch whole again, so images
    that depend on their batch companions equal those of an uninterrupted run, byte for byte."""
    model = Denoiser(BatchCoupled(), linear_schedule(), "coupled", {})
    out, clean = tmp_path / "resumed", tmp_path / "clean"
    _interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _run(model, range(8), out, batch_size=4)
    monkeypatch.undo()
    _run(model, range(8), out, batch_size=4)
    _run(model, range(8), clean, batch_size=4)
    for seed in range(8):
        name = f"samples/{seed:06d}.png"
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_manifest_records_every_writer(tmp_path: Path, tame_denoiser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process appends host, pid, start time and what it was asked for before writing an image."""
    out = tmp_path / "run"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(tame_denoiser, range(4), out)
    monkeypatch.undo()
    (first,) = _manifest(out)["sessions"]
    assert first["pid"] == os.getpid() and first["host"] and first["since"] and first["seeds"] == "0-3"
    assert first["execution"] == {"batch_size": 4, "device": "cpu", "compile": False}
    _run(tame_denoiser, range(6), out)
    sessions = _manifest(out)["sessions"]
    assert [s["seeds"] for s in sessions] == ["0-3", "0-5"] and sessions[1]["seeds_sampled"] == 5


def test_images_without_a_manifest_are_refused(tmp_path: Path, tame_denoiser) -> None:
    """PNGs that no manifest describes (an interrupted run of an older modiff) are not adopted."""
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(out / "samples" / "000000.png")
    with pytest.raises(ValueError, match="no manifest.json"):
        _run(tame_denoiser, range(2), out)


def test_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path: Path, tame_denoiser) -> None:
    """Another live process holding the folder: refused, naming its pid and host. Killed with SIGKILL,
    its lock is gone and the run goes on."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from modiff.utils.locks import folder_lock\n"
                               "with folder_lock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid} on host") as err:
            _run(tame_denoiser, range(2), out)
        assert "another --out" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    _run(tame_denoiser, range(2), out)
    assert _manifest(out)["seeds"] == [0, 1]


def test_lock_is_exclusive_within_a_process(tmp_path: Path) -> None:
    """Two holders in one process (two threads, two library calls) exclude each other too."""
    with folder_lock(tmp_path) as me:
        with pytest.raises(FolderLockedError, match=f"pid {me['pid']}"):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):
        pass


def test_non_finite_samples_name_seeds_and_step(tmp_path: Path) -> None:
    """NaN from t < 500 on (uniform 5 steps: 800, 600, 400, ...): the error names the seeds and step 3
    (t=400); no black PNG is written."""
    model = Denoiser(NaNBelow(500), linear_schedule(), "nan", {})
    with pytest.raises(NonFiniteSamplesError, match=r"seeds 0-2: first at sampling step 3 of 5 \(t=400\)"):
        _run(model, range(3), tmp_path / "run", SampleConfig(steps=5))
    assert not list((tmp_path / "run" / "samples").glob("*.png"))


def test_nan_bias_checkpoint_fails_at_the_first_step(tmp_path: Path, tame_denoiser) -> None:
    """A NaN bias (the issue's broken checkpoint) fails at step 1, not with black images."""
    with torch.no_grad():
        tame_denoiser.net.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteSamplesError, match=r"seeds 0-1: first at sampling step 1 of 4 \(t=999\)"):
        _run(tame_denoiser, range(2), tmp_path / "run")


def test_unreadable_png_of_a_resumed_run_is_made_again(tmp_path: Path, tame_denoiser, caplog) -> None:
    """A truncated and a garbage PNG are named in a warning and made again; the run ends as a clean one."""
    out, clean = _run(tame_denoiser, range(4), tmp_path / "run"), _run(tame_denoiser, range(4), tmp_path / "clean")
    good = (out / "samples" / "000001.png").read_bytes()
    (out / "samples" / "000001.png").write_bytes(good[: len(good) // 2])
    (out / "samples" / "000002.png").write_bytes(os.urandom(200))
    with caplog.at_level(logging.WARNING):
        _run(tame_denoiser, range(4), out)
    assert "000001.png is not a readable PNG" in caplog.text and "000002.png" in caplog.text
    for seed in range(4):
        name = f"samples/{seed:06d}.png"
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert _manifest(out)["sessions"][-1]["seeds_sampled"] == 2


def test_full_disk_names_the_folder_and_keeps_the_images(tmp_path: Path, tame_denoiser,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing the third PNG's bytes: DiskFullError names the samples folder; two PNGs stay whole."""
    fail_file_write(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match=f"no space left on the device of {out / 'samples'}"):
        _run(tame_denoiser, range(4), out)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000000.png", "000001.png"]
    _run(tame_denoiser, range(4), out)
