"""Errors a user can act on (issue 23): one or two lines naming the file or value and what to do, in
command-line words, never a traceback."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from modiff.cli import main
from modiff.pipelines.train import DDIMTrainConfig, export_weights

from conftest import TINY, fail_file_write, official_yaml, tiny_net


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _clean_error(result, exit_code: int = 1) -> str:
    """The output of a command that failed as a user error: the exit code, no traceback, short."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 6, result.output
    return result.output


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    return folder


def _sample(*args: str, out: Path):
    return _invoke("sample", "--seeds", "0-1", "--steps", "2", "--device", "cpu", *args, "--out", str(out))


@pytest.mark.parametrize("seeds, says", [("0-99999999999", "at most 1,000,000"),
                                         ("99999999999999999999", "too large")])
def test_too_many_or_too_large_seeds(tmp_path: Path, seeds: str, says: str) -> None:
    """A range of 10^11 seeds (a MemoryError before) and a 20-digit seed are usage errors."""
    output = _clean_error(_invoke("sample", "--seeds", seeds, "--out", str(tmp_path / "run")), 2)
    assert "--seeds" in output and says in output


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_below_one(tmp_path: Path, size: str) -> None:
    output = _clean_error(_invoke("sample", "--batch-size", size, "--out", str(tmp_path / "run")), 2)
    assert "'--batch-size'" in output and ">=1" in output


def test_unknown_device(tmp_path: Path) -> None:
    output = _clean_error(_invoke("sample", "--device", "gpu0", "--out", str(tmp_path / "run")), 2)
    assert "'--device'" in output and "gpu0" in output and "cuda:N" in output


def test_yaml_that_does_not_parse(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"x")
    (tmp_path / "bad.yaml").write_text("model:\n  ch: [64\n  out_ch: 1\n")
    output = _clean_error(_sample("--model", str(tmp_path / "model.ckpt"), "--config", str(tmp_path / "bad.yaml"),
                                  out=tmp_path / "run"))
    assert "bad.yaml is not valid YAML" in output and "line" in output


# Seeds whose 4,096 random bytes stop the unpickler with UnpicklingError (0), IndexError (17), UnicodeDecodeError
# (54) and KeyError (62): each way foreign bytes fail.
@pytest.mark.parametrize("seed", [0, 17, 54, 62])
def test_random_bytes_as_a_checkpoint(tmp_path: Path, seed: int) -> None:
    """Random bytes as .ckpt: named as damaged, and never the advice to unpickle with weights_only=False."""
    (tmp_path / "model.ckpt").write_bytes(np.random.default_rng(seed).bytes(4096))
    (tmp_path / "config.yml").write_text(yaml.safe_dump(official_yaml()))
    output = _clean_error(_sample("--model", str(tmp_path / "model.ckpt"), "--config", str(tmp_path / "config.yml"),
                                  out=tmp_path / "run"))
    assert "model.ckpt is not a readable PyTorch checkpoint" in output and "weights_only" not in output


def test_checkpoint_without_config_in_cli_words(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"x")
    output = _clean_error(_sample("--model", str(tmp_path / "model.ckpt"), out=tmp_path / "run"), 2)
    assert "--config FILE" in output and "config=" not in output


def test_unknown_model_in_cli_words(tmp_path: Path) -> None:
    output = _clean_error(_sample("--model", "fmnist-dim", out=tmp_path / "run"))
    assert "--model 'fmnist-dim'" in output and "fmnist-ddim" in output and "config=" not in output


def test_truncated_shard_is_named(tiny_folder: Path, tmp_path: Path) -> None:
    shard = tiny_folder / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    output = _clean_error(_sample("--model", str(tiny_folder), out=tmp_path / "run"))
    assert "model-00001-of-00001.safetensors is truncated or damaged" in output


def test_damaged_shard_of_the_right_size_is_caught(tiny_folder: Path, tmp_path: Path) -> None:
    """Bytes flipped inside a tensor keep the file readable: only the manifest's checksum catches it."""
    shard = tiny_folder / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    shard.write_bytes(bytes(data))
    output = _clean_error(_sample("--model", str(tiny_folder), out=tmp_path / "run"))
    assert "model-00001-of-00001.safetensors is damaged: its SHA-256" in output


def test_shipped_models_carry_checksums() -> None:
    """Every shard of the shipped model folders is listed, with its size, in the folder's manifest."""
    from modiff.pipelines.train import shard_names
    from modiff.utils.paths import data_dir

    for name in ("fmnist-ddim", "fmnist-ldm"):
        folder = data_dir() / name
        listed = json.loads((folder / "manifest.json").read_text())["checksums"]
        assert sorted(listed) == shard_names(folder)
        assert all(listed[s]["bytes"] == (folder / s).stat().st_size for s in listed)
    assert "model.safetensors" in json.loads((data_dir() / "fmnist-classifier" / "manifest.json").read_text())["checksums"]


def test_garbage_png_in_a_folder_given_to_fid(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(11):
        Image.fromarray(np.full((28, 28), i * 20, np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "005.png").write_bytes((folder / "005.png").read_bytes()[:40])
    output = _clean_error(_invoke("fid", str(folder), "--ref", "fmnist-test", "--metrics", "fid", "--device", "cpu"))
    assert "005.png is not a readable image" in output


def test_fid_without_fashion_mnist_names_what_fid_takes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the images and with no statistics cached, `fid --ref fmnist-train` says where it looked and
    how to point it at the files: MODIFF_DATA_DIR, not an option that `fid` does not have."""
    import modiff.datasets
    from modiff.metrics import fidelity

    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        Image.fromarray(np.full((28, 28), i * 20, np.uint8)).save(images / f"{i:03d}.png")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fidelity, "shipped_cache", lambda: tmp_path / "nothing-shipped")
    monkeypatch.setattr(modiff.datasets, "fashion_mnist_dirs", lambda data_dir=None: [tmp_path / "empty"])
    monkeypatch.setattr(modiff.datasets, "_download", lambda split: None)
    result = _invoke("fid", str(images), "--ref", "fmnist-train", "--metrics", "fid", "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    output = result.output[result.output.index("Error: "):]  # after torch-fidelity's progress lines
    assert "Fashion-MNIST (train) not found" in output and str(tmp_path / "empty") in output
    assert "set MODIFF_DATA_DIR=FOLDER" in output
    fid_options = {opt for param in main.commands["fid"].params for opt in getattr(param, "opts", [])}
    told = {word.strip("`.,()") for word in output.split() if word.startswith("--")}
    assert told - fid_options == {"--data-dir"} and "`modiff train` also takes --data-dir" in output


def test_full_disk_names_the_folder(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_file_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "run"
    output = _clean_error(_sample("--model", str(tiny_folder), out=out))
    assert f"no space left on the device of {out / 'samples'}" in output.replace("\n", " ")
    assert (out / "samples" / "000000.png").is_file()


def test_calibrate_data_into_an_existing_dataset_is_refused_before_sampling(
        tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modiff.quant.ptq.data as data

    def must_not_sample(*args, **kwargs):
        raise AssertionError("sampled before refusing")

    out = tmp_path / "calib"
    out.mkdir()
    (out / "manifest.json").write_text('{"kind": "calibration-data"}')
    monkeypatch.setattr(data, "collect_calib_data", must_not_sample)
    output = _clean_error(_invoke("calibrate-data", "--model", str(tiny_folder), "--steps", "4", "--calib-steps", "2",
                                  "--samples-per-step", "2", "--device", "cpu", "--out", str(out)))
    assert "already holds a calibration dataset" in output and "--out" in output
