"""`modiff record` on a tiny exported model."""
from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from modiff.cli import main
from modiff.record import load_recording
from modiff.pipelines.train import DDIMTrainConfig, export_weights

from conftest import TINY, tiny_net


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_record_command_writes_a_loadable_recording(tmp_path: Path) -> None:
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    out = tmp_path / "rec"
    args = ["record", "--model", str(tmp_path / "tiny"), "--steps", "3", "--seeds", "0-1", "--batch-size", "1",
            "--sites", "net.mid.*", "--tensors", "net.mid.block_1.conv1", "--device", "cpu", "--out", str(out)]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    recording = load_recording(out)
    assert recording.manifest["trajectories"] == 2 and recording.manifest["metadata"]["seeds"] == "0-1"
    assert recording.manifest["metadata"]["model"] == str(tmp_path / "tiny")
    assert all(s.startswith("net.mid.") for s in recording.stats.site) and set(recording.stats.kind) == {"raw", "diff"}
    assert len(recording.steps) == len(recording.timesteps) and None not in recording.timesteps
    x = recording.tensor("net.mid.block_1.conv1", recording.steps[-1])
    assert x.shape[0] == 2 and x.dtype == torch.float32 and recording.tensor_rows("net.mid.block_1.conv1", 0) == [0, 1]
    again = _invoke(*args)
    assert again.exit_code == 1 and "not empty" in again.output and "Traceback" not in again.output
    import modiff as md

    quad = _invoke(*[a if a != str(out) else str(tmp_path / "quad") for a in args[:-2]], "--spacing", "quad",
                   "--steps", "10", "--out", str(tmp_path / "quad"))
    assert quad.exit_code == 0, quad.output
    assert load_recording(tmp_path / "quad").timesteps == [int(t) for t in md.timesteps(10, "quad")]
    assert load_recording(tmp_path / "quad").timesteps != [int(t) for t in md.timesteps(10, "uniform")]


def test_record_help_shows_examples_and_bad_sites_are_clear(tmp_path: Path) -> None:
    help_text = _invoke("record", "--help")
    assert help_text.exit_code == 0 and "modiff record --steps 100 --seeds 0-63 --out" in help_text.output
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    bad = _invoke("record", "--model", str(tmp_path / "tiny"), "--sites", "net.nope.*", "--steps", "2", "--seeds", "0",
                  "--device", "cpu", "--out", str(tmp_path / "rec"))
    assert bad.exit_code == 1 and "net.nope.*" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "rec").exists()  # a bad spec fails before any directory is made
