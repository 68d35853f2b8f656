"""The shipped-calibration check of `analysis.step_sizes` reproduces the calibration's own records of its first unit
from the shipped files alone, reads every unit's recorded losses where the calibration kept them, and refuses a network
whose first layer reads the image."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
from torch import nn

import modiff as md
from analysis.step_sizes import (_recorded_first_unit, all_units_finding, first_layer_input, per_preset,
                                 recorded_unit_losses, save_check, step_size_finding, time_embedding_step_sizes)
from modiff.pipelines.train import DDIMTrainConfig, export_weights
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.calibrate import CalibrationConfig
from modiff.quant.ptq.data import CalibDataConfig
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.ptq.reuse import Calibration, calibrate_shipped
from modiff.quant.ptq.saved import read_manifest
from modiff.quant.ptq.shipped import CALIBRATION_DIR
from modiff.utils.checksums import sha256_file
from conftest import TINY, tiny_net

CALIBRATION = Calibration(
    CalibDataConfig(steps=6, calib_steps=3, samples_per_step=4, batch_size=4),
    CalibrationConfig(AdaRoundConfig(iters=3, batch_size=4, log_every=3),
                      ActCalibConfig(iters=40, batch_size=4, lr=1e-2, log_every=40), capture_batch=4),
)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> md.Denoiser:
    folder = tmp_path_factory.mktemp("step_sizes") / "tiny"
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    calibrate_shipped(md.load_model(folder), ["qdiff-w4a4", "qdiff-w4a4-modiff"], CALIBRATION, "cpu", "test")
    return md.load_model(folder)


def test_the_check_reproduces_the_calibrations_own_first_unit(shipped: md.Denoiser) -> None:
    table = time_embedding_step_sizes(shipped).set_index("preset")
    assert list(table.index) == ["qdiff-w4a4", "qdiff-w4a4-modiff"]
    assert set(table.layer) == {"net.temb.dense.0"} and set(table.timesteps) == {3}
    for preset, row in table.iterrows():
        report = read_manifest(shipped.folder / CALIBRATION_DIR / "quantized" / preset)["metadata"]["report"]
        first = report["activations"][0]
        assert first["unit"] == "net.temb.dense.0"
        assert row.loss_start == pytest.approx(first["loss_start"], rel=1e-5)
        assert row.loss_learned == pytest.approx(first["loss_learned"], rel=1e-5)
        assert row.loss_ratio == pytest.approx(first["loss_learned"] / first["loss_start"], rel=1e-5)
        assert row.scale_learned != row.scale_start
    assert table.loc["qdiff-w4a4-modiff", "calibration_inputs"] == "residuals"
    finding = step_size_finding(table.reset_index())
    assert "moved from its observer start in 2 of 2 presets." in finding


def test_every_units_recorded_losses_are_read_per_preset(shipped: md.Denoiser) -> None:
    units = recorded_unit_losses(shipped)
    summary = json.loads((shipped.folder / CALIBRATION_DIR / "summary.json").read_text())["activations"]
    table = per_preset(units).set_index("preset")
    for preset, inputs in (("qdiff-w4a4", "activations"), ("qdiff-w4a4-modiff", "residuals")):
        report = read_manifest(shipped.folder / CALIBRATION_DIR / "quantized" / preset)["metadata"]["report"]
        mine = units[units.preset == preset]
        assert list(mine.unit) == [r["unit"] for r in report["activations"]] and len(mine) > 1
        assert list(mine.loss_start) == [r["loss_start"] for r in report["activations"]]
        assert list(mine.loss_ratio) == [r["loss_learned"] / r["loss_start"] for r in report["activations"]]
        assert set(mine.calibration_inputs) == {inputs}
        # the calibration's own summary (`modiff.quant.ptq.calibrate.step_size_summary`) counts them the same way
        assert table.loc[preset, "units"] == summary[preset]["units"]
        assert table.loc[preset, "units_lowered"] == summary[preset]["units_lowered"]
        assert table.loc[preset, "median_loss_ratio"] == pytest.approx(summary[preset]["median_loss_ratio"], rel=1e-12)
        assert table.loc[preset, "max_loss_ratio"] == max(r["loss_learned"] / r["loss_start"] for r in report["activations"])


def test_the_record_check_names_presets_it_does_not_reproduce(shipped: md.Denoiser) -> None:
    units, first = recorded_unit_losses(shipped), time_embedding_step_sizes(shipped)
    met = all_units_finding(units, _recorded_first_unit(first, units), 2)
    assert "within 0.001 (relative) in 2 of the 2 presets that kept one" in met and "not in" not in met
    assert "(2 of its 2 presets" in met and "predates" not in met
    off = first.assign(recorded_loss_start=first.loss_start, recorded_loss_learned=first.loss_learned * 1.5)
    missed = all_units_finding(units, off, 2)
    assert "in 0 of the 2 presets that kept one (largest difference 0.33); not in qdiff-w4a4, qdiff-w4a4-modiff" in missed


def test_a_start_loss_of_zero_has_no_ratio(shipped: md.Denoiser, tmp_path: Path) -> None:
    """A unit whose start loss is 0 (nothing to lower) counts as a unit, not lowered, and has no ratio, as the
    calibration's own summary counts it."""
    def three_units(summary: dict) -> None:
        units = summary["activations"]["qdiff-w4a4"]["per_unit"]
        for unit, (start, learned) in zip(units, [(0.0, 0.5), (2.0, 1.0), (1.0, 3.0)]):
            unit.update(loss_start=start, loss_learned=learned)
        del units[3:]

    folder = _edited_summary(shipped, tmp_path / "zero", three_units)
    recorded = recorded_unit_losses(md.load_model(folder))
    assert pd.isna(recorded.loss_ratio.iloc[0])
    row = per_preset(recorded).set_index("preset").loc["qdiff-w4a4"]
    assert (row.units, row.units_lowered, row.median_loss_ratio, row.max_loss_ratio) == (3, 1, 1.75, 3.0)


def _edited_summary(shipped: md.Denoiser, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of ``shipped``'s folder whose calibration summary ``edit`` changed in place, its checksum updated."""
    shutil.copytree(shipped.folder, folder)
    path = folder / CALIBRATION_DIR / "summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    manifest_path = folder / CALIBRATION_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["summary.json"]["sha256"] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))
    return folder


def _without_records(shipped: md.Denoiser, folder: Path, presets: tuple[str, ...]) -> md.Denoiser:
    """A copy of ``shipped`` whose summary lacks the per-unit records of ``presets`` (as before 244591f)."""
    def drop(summary: dict) -> None:
        for preset in presets:
            for unit in summary["activations"][preset]["per_unit"]:
                del unit["loss_start"], unit["loss_learned"]

    return md.load_model(_edited_summary(shipped, folder, drop))


def test_presets_without_unit_records_give_no_all_units_table(shipped: md.Denoiser, tmp_path: Path) -> None:
    """A calibration from before the per-unit records has nothing to summarize, and its first-unit table gets no
    recorded columns; where only some presets kept them, the finding says how many."""
    old = _without_records(shipped, tmp_path / "old", ("qdiff-w4a4", "qdiff-w4a4-modiff"))
    assert recorded_unit_losses(old).empty
    finding = save_check(old, tmp_path / "out")
    assert "No preset of this calibration recorded every unit's loss" in finding
    assert not (tmp_path / "out" / "tables" / "table1_step_sizes_all_units.csv").exists()
    assert "recorded_loss_start" not in pd.read_csv(tmp_path / "out" / "tables" / "table1_step_sizes.csv")
    mixed = _without_records(shipped, tmp_path / "mixed", ("qdiff-w4a4",))
    finding = save_check(mixed, tmp_path / "mixed_out")
    assert "(1 of its 2 presets" in finding and "the other presets' calibration predates these records" in finding
    assert "in 1 of the 1 presets that kept one" in finding
    saved = pd.read_csv(tmp_path / "mixed_out" / "tables" / "table1_step_sizes.csv").set_index("preset")
    assert pd.isna(saved.loc["qdiff-w4a4", "recorded_loss_start"])


def test_a_damaged_summary_is_refused(shipped: md.Denoiser, tmp_path: Path) -> None:
    shutil.copytree(shipped.folder, tmp_path / "damaged")
    (tmp_path / "damaged" / CALIBRATION_DIR / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="checksum mismatch"):
        recorded_unit_losses(md.load_model(tmp_path / "damaged"))
    assert "Not checked: checksum mismatch" in save_check(md.load_model(tmp_path / "damaged"), tmp_path / "out")


def test_no_shipped_calibration_gives_an_empty_table(tiny_denoiser: md.Denoiser) -> None:
    assert time_embedding_step_sizes(tiny_denoiser).empty
    assert "ships no calibration" in step_size_finding(time_embedding_step_sizes(tiny_denoiser))


class _ImageFirst(nn.Module):
    sample_shape = (1, 4, 4)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + t.view(-1, 1, 1, 1)


def test_a_first_layer_that_reads_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match=r"first layer the network calls \(conv\) reads the image"):
        first_layer_input(_ImageFirst(), torch.tensor([1, 2]))


def test_the_saved_check_is_the_table_and_its_finding(shipped: md.Denoiser, tiny_denoiser: md.Denoiser,
                                                      tmp_path: Path) -> None:
    finding = save_check(shipped, tmp_path)
    assert (tmp_path / "tables" / "table1_step_sizes_finding.md").read_text().strip() == finding.strip()
    saved = pd.read_csv(tmp_path / "tables" / "table1_step_sizes.csv")
    assert len(saved) == 2
    assert saved.recorded_loss_start.to_numpy() == pytest.approx(saved.loss_start.to_numpy(), rel=1e-5)
    per_preset = pd.read_csv(tmp_path / "tables" / "table1_step_sizes_all_units.csv").set_index("preset")
    units = recorded_unit_losses(shipped)
    assert per_preset.loc["qdiff-w4a4", "units"] == (units.preset == "qdiff-w4a4").sum()
    assert "meets the calibration's own record of it within 0.001 (relative) in 2 of the 2 presets" in finding
    for folder, own, says in (("none", False, "ships no calibration"), ("own", True, "calibration their notebook made")):
        assert says in save_check(tiny_denoiser if folder == "none" else shipped, tmp_path / folder, own)
        assert says in (tmp_path / folder / "tables" / "table1_step_sizes_finding.md").read_text()
        assert not (tmp_path / folder / "tables" / "table1_step_sizes.csv").exists()
