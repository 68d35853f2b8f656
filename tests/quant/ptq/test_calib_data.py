"""Time-step-aware calibration data: chosen steps, (x_before, x_t) pairs, storage, save/load, errors."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import modiff as md
from modiff.quant.ptq.data import (CalibDataConfig, chosen_indices, collect_calib_data, load_calib_data,
                                     save_calib_data)


def test_published_defaults() -> None:
    config = CalibDataConfig()
    assert (config.steps, config.calib_steps, config.samples_per_step, config.eta) == (100, 20, 256, 0.0)
    assert config.torch_dtype == torch.float16


def test_chosen_indices_are_spread_and_distinct() -> None:
    # round(linspace(1, 99, 20)): steps 98/19 = 5.157... apart (hand-computed).
    assert chosen_indices(100, 20) == [1, 6, 11, 16, 22, 27, 32, 37, 42, 47, 53, 58, 63, 68, 73, 78, 84, 89, 94, 99]
    assert chosen_indices(10, 9) == list(range(1, 10))
    assert chosen_indices(10, 1) == [1]


def test_steps_and_pairs_match_a_direct_sampling_run(tiny_denoiser: md.Denoiser) -> None:
    """Rows of step k hold x_t of that step and x_t of the step before, per seed, as a plain run gives."""
    config = CalibDataConfig(steps=10, calib_steps=3, samples_per_step=3, dtype="float32")
    data = collect_calib_data(tiny_denoiser, config)
    ts = md.timesteps(10)
    seen: dict[int, torch.Tensor] = {}
    md.sample_ddim(tiny_denoiser, md.noise(range(3), tiny_denoiser.sample_shape), ts,
                   callback=lambda info: seen.__setitem__(info.index, info.x_t.clone()))
    assert data.index.tolist() == [1] * 3 + [5] * 3 + [9] * 3
    assert data.t.tolist() == [ts[1]] * 3 + [ts[5]] * 3 + [ts[9]] * 3 == [800] * 3 + [400] * 3 + [0] * 3
    assert data.t_before.tolist() == [900] * 3 + [500] * 3 + [100] * 3
    for k, index in enumerate((1, 5, 9)):
        rows = slice(3 * k, 3 * k + 3)
        assert torch.equal(data.x[rows], seen[index]) and torch.equal(data.x_before[rows], seen[index - 1])
    # The pass may run in batches: same seeds, same inputs (up to convolution round-off).
    batched = collect_calib_data(tiny_denoiser, replace(config, batch_size=2))
    torch.testing.assert_close(batched.x, data.x, rtol=1e-3, atol=1e-4)


def test_compact_storage_and_subset(tiny_denoiser: md.Denoiser) -> None:
    data = collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=4))
    assert data.x.dtype == data.x_before.dtype == torch.float16 and data.t.dtype == torch.long
    small = data.subset(2)
    assert len(small) == 4 and small.config.samples_per_step == 2
    torch.testing.assert_close(small.x, torch.cat([data.x[0:2], data.x[4:6]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"samples_per_step must be in \[1, 4\]"):
        data.subset(5)


def test_save_load_round_trip(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    data = collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=2))
    folder = save_calib_data(data, tmp_path / "calib", metadata={"model": "tiny"})
    loaded = load_calib_data(folder)
    for key, value in data.tensors().items():
        assert torch.equal(getattr(loaded, key), value), key
    assert loaded.config == data.config
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"] == asdict(data.config) and manifest["timesteps"] == [830, 0]  # timesteps(6): 7 entries 996 .. 0; indices 1, 6
    assert manifest["metadata"] == {"model": "tiny"} and manifest["samples"] == 4
    with pytest.raises(ValueError, match="already holds a calibration dataset"):
        save_calib_data(data, folder)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"calib_steps must be in \[1, steps - 1 = 9\]"):
        CalibDataConfig(steps=10, calib_steps=10)
    with pytest.raises(ValueError, match="dtype must be one of"):
        CalibDataConfig(dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be >= 2"):
        CalibDataConfig(steps=1, calib_steps=1)
    with pytest.raises(FileNotFoundError, match="modiff calibrate-data"):
        load_calib_data(tmp_path)
