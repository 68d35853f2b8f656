"""The shipped-calibration check of `analysis.step_sizes` reproduces the calibration's own records of its first unit
from the shipped files alone, and refuses a network whose first layer reads the image."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import modiff as md
from analysis.step_sizes import first_layer_input, save_check, step_size_finding, time_embedding_step_sizes
from modiff.pipelines.train import DDIMTrainConfig, export_weights
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.calibrate import CalibrationConfig
from modiff.quant.ptq.data import CalibDataConfig
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.ptq.reuse import Calibration, calibrate_shipped
from modiff.quant.ptq.saved import read_manifest
from modiff.quant.ptq.shipped import CALIBRATION_DIR
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
    assert len(pd.read_csv(tmp_path / "tables" / "table1_step_sizes.csv")) == 2
    for folder, own, says in (("none", False, "ships no calibration"), ("own", True, "calibration their notebook made")):
        assert says in save_check(tiny_denoiser if folder == "none" else shipped, tmp_path / folder, own)
        assert says in (tmp_path / folder / "tables" / "table1_step_sizes_finding.md").read_text()
        assert not (tmp_path / folder / "tables" / "table1_step_sizes.csv").exists()
