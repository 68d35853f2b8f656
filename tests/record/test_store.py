"""The recording directory: round trip, shards under a memory budget, trajectories, sample selection."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from modiff.record import Stats, TensorSpec, load_recording, record

TS = (900, 600, 300)


def _model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _batch(rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 6, generator=g) + s for s in range(3)]


@torch.no_grad()
def _trajectory(model: nn.Module, rec, inputs: list[torch.Tensor]) -> None:
    for s, x in enumerate(inputs):
        model(x)
        rec.on_step(SimpleNamespace(index=s, t=TS[s]))
    rec.next_trajectory()


def test_round_trip_with_shards_under_a_tiny_budget(tmp_path: Path) -> None:
    """~0.01 MB budget: several shards, each tensor read back exactly; stats rows as expected."""
    model, inputs = _model(), _batch(128, 0)  # site "0": 128x6 floats (3 kB); site "2": 128x16 (8 kB)
    with record(model, "linear", [Stats()], tensors=TensorSpec("linear"), out_dir=tmp_path / "rec",
                memory_budget_mb=0.01, metadata={"note": "test"}) as rec:
        _trajectory(model, rec, inputs)
    recording = load_recording(tmp_path / "rec")
    shards = sorted(p.name for p in (tmp_path / "rec").glob("tensors-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == "tensors-00001.safetensors"
    for shard in shards:  # none holds much more than the budget (one tensor past it at most)
        assert (tmp_path / "rec" / shard).stat().st_size < 10_486 + 8 * 1024 + 1024
    index = json.loads((tmp_path / "rec" / "tensors.index.json").read_text())
    assert index["weight_map"]["0/input/step=002/call=0"] in shards
    for s in range(3):
        assert torch.equal(recording.tensor("0", s), inputs[s])
        assert torch.allclose(recording.tensor("2", s), torch.relu(model[0](inputs[s])))
    stats = recording.stats
    assert list(stats.columns) == ["site", "capture", "kind", "step", "t", "call", "reducer", "statistic", "value"]
    assert len(stats) == 2 * (3 + 2) * 8  # sites x (raw steps + diff steps) x Stats' 8 statistics
    mean = stats[(stats.site == "0") & (stats.kind == "raw") & (stats.step == 1) & (stats.statistic == "mean")]
    assert mean.value.item() == pytest.approx(float(inputs[1].double().mean()))
    assert recording.manifest["steps"] == [0, 1, 2] and recording.manifest["timesteps"] == list(TS)
    assert recording.manifest["metadata"] == {"note": "test"}
    assert recording.manifest["sites"][0] == {"name": "0", "shapes": {"input": [128, 6]}}
    assert "torch" in recording.manifest["environment"] and recording.manifest["model"]["parameters"] == 6 * 16 + 16 + 16 * 4 + 4


def test_trajectories_merge_statistics_and_number_samples_on(tmp_path: Path) -> None:
    """Two batches of 4: statistics of step s cover both; sample 6 is row 2 of the second batch."""
    model, first, second = _model(), _batch(4, 1), _batch(4, 2)
    with record(model, "linear", [Stats()], tensors=TensorSpec("0", steps=[0, 2], samples=[1, 6]),
                out_dir=tmp_path / "rec") as rec:
        _trajectory(model, rec, first)
        _trajectory(model, rec, second)
    recording = load_recording(tmp_path / "rec")
    assert recording.manifest["trajectories"] == 2
    assert torch.equal(recording.tensor("0", 2), torch.cat([first[2][1:2], second[2][2:3]]))
    assert recording.tensor_rows("0", 2) == [1, 6]
    with pytest.raises(KeyError, match="no tensor"):
        recording.tensor("0", 1)  # step 1 was not asked for
    stats = recording.stats
    pick = stats[(stats.site == "0") & (stats.step == 2) & (stats.statistic == "mean")].set_index("kind").value
    assert pick["raw"] == pytest.approx(float(torch.cat([first[2], second[2]]).double().mean()))
    diffs = torch.cat([first[2] - first[1], second[2] - second[1]])  # never across trajectories
    assert pick["diff"] == pytest.approx(float(diffs.double().mean()))


def test_save_elsewhere_copies_the_shards(tmp_path: Path) -> None:
    model = _model()
    with record(model, "linear", [Stats()], tensors=TensorSpec("0"), out_dir=tmp_path / "a") as rec:
        _trajectory(model, rec, _batch(2, 0))
    rec.save(tmp_path / "b")
    again = load_recording(tmp_path / "b")
    assert torch.equal(again.tensor("0", 1), load_recording(tmp_path / "a").tensor("0", 1))
    with safe_open(str(tmp_path / "b" / "tensors-00001.safetensors"), framework="pt") as f:
        assert "0/input/step=000/call=0" in f.keys()
    with pytest.raises(ValueError, match="not an empty directory"):
        rec.save(tmp_path / "a" / "tensors-00001.safetensors")


def test_not_a_recording_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_recording(tmp_path)
