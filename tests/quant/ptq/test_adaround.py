"""AdaRound: rectified sigmoid and its start, the beta schedule, single-layer and block reconstruction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import modiff as md
from modiff.quant import QuantConfig, QuantSpec, WeightQuant, quantize
from modiff.quant.ptq.adaround import AdaRoundConfig, AdaRoundWeight, beta_at, rectified_sigmoid
from modiff.quant.ptq.data import CalibData, CalibDataConfig, collect_calib_data
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate, calibrate_weights
from modiff.quant.layers.direct import QuantLayer, weight_grid
from modiff.quant.ptq.reconstruct import Unit, lp_loss, reconstruct_weights, reconstruction_units


def test_published_defaults() -> None:
    c = AdaRoundConfig()
    assert (c.iters, c.batch_size, c.lr, c.reg_weight, c.beta_start, c.beta_end, c.warmup, c.p) == (
        20_000, 32, 1e-3, 0.01, 20.0, 2.0, 0.2, 2.0)
    assert (c.init, c.init_p) == ("mse", 2.4)


def test_rectified_sigmoid_and_start() -> None:
    """h(V) = clip(1.2 sigmoid(V) - 0.1, 0, 1); V starts where h equals the fractional part, so W_soft = W."""
    assert rectified_sigmoid(torch.tensor([0.0, 20.0, -20.0])).tolist() == pytest.approx([0.5, 1.0, 0.0])
    w = torch.tensor([[0.26, -0.51, 0.74, 0.0]])
    spec = QuantSpec(bits=4, granularity="channel", channel_axis=0)
    scale, zero_point = torch.tensor([[0.1]]), torch.tensor([[8.0]])
    r = AdaRoundWeight(w, scale, zero_point, spec)
    torch.testing.assert_close(rectified_sigmoid(r.v), torch.tensor([[0.6, 0.9, 0.4, 0.0]]), atol=1e-4, rtol=0)
    # W_soft = W inside the grid; 0.74 lies above its top s (15 - 8) = 0.7 and is clamped there.
    torch.testing.assert_close(r(), torch.tensor([[0.26, -0.51, 0.7, 0.0]]), atol=1e-6, rtol=0)
    assert r.nearest_codes().tolist() == [[11.0, 3.0, 15.0, 8.0]]  # round(w / s) + 8, clamped to [0, 15]
    with torch.no_grad():
        r.v.copy_(torch.tensor([[-1.0, 1.0, 1.0, 0.0]]))
    assert r.hard_codes().tolist() == [[10.0, 3.0, 15.0, 9.0]]  # floor + [V >= 0] + 8 (0.74/0.1 + 1 + 8 clamps)


def test_regulariser_hand_values() -> None:
    spec = QuantSpec(bits=4, granularity="channel", channel_axis=0)
    r = AdaRoundWeight(torch.tensor([[0.05, 0.0]]), torch.tensor([[0.1]]), torch.tensor([[0.0]]), spec)
    r()  # h = (0.5, 0): 1 - |0|^2 + 1 - |-1|^2 = 1
    assert float(r.regulariser(torch.tensor(2.0)).detach()) == pytest.approx(1.0, abs=1e-5)


def test_beta_schedule() -> None:
    c = AdaRoundConfig(iters=100)
    assert beta_at(0, c) == (20.0, 0.0) and beta_at(19, c) == (20.0, 0.0)  # warm-up: no regulariser
    assert beta_at(20, c) == (20.0, 0.01)
    assert beta_at(60, c) == (pytest.approx(11.0), 0.01)  # halfway through the decay
    assert beta_at(100, c) == (pytest.approx(2.0), 0.01)


class _OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _layer_data(n: int = 256) -> CalibData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen) @ torch.randn(4, 16, generator=gen)  # correlated inputs
    zeros = torch.zeros(n, dtype=torch.long)
    return CalibData(x=x, t=zeros, x_before=x, t_before=zeros, index=zeros,
                     config=CalibDataConfig(steps=2, calib_steps=1, samples_per_step=n))


def test_single_layer_beats_round_to_nearest() -> None:
    torch.manual_seed(0)
    fp, data = _OneLayer().eval(), _layer_data()
    qmodel = quantize(fp, QuantConfig(weight=WeightQuant(QuantSpec(bits=3, granularity="channel", channel_axis=0)),
                                      activation=None))
    layer: QuantLayer = qmodel.fc
    nearest_w = layer.weight_q.clone()
    units = reconstruction_units(qmodel, data)
    assert units == [Unit("fc", ("fc",))]
    with torch.no_grad():
        target = fp(data.x, data.t)
        before = float(lp_loss(qmodel(data.x, data.t), target, 2.0))
    config = AdaRoundConfig(iters=400, batch_size=64, lr=1e-2, init="minmax", log_every=100, storage_dtype="float32")
    records = reconstruct_weights(qmodel, fp, data, units, config, progress=False)
    with torch.no_grad():
        after = float(lp_loss(qmodel(data.x, data.t), target, 2.0))
    assert after < 0.9 * before, (before, after)
    assert records[0]["flipped"] > 0  # some weights rounded away from the nearest grid point
    # The record compares both roundings on the same grid over all the calibration inputs.
    assert records[0]["loss_nearest"] == pytest.approx(before, rel=1e-5)
    assert records[0]["loss_adaround"] == pytest.approx(after, rel=1e-5)
    # Hard rounding: integer codes, each 0/1 above the floor, within one grid step of the nearest.
    scale, zero_point = weight_grid(layer.weight, layer.config.weight, method="minmax")
    codes = layer.weight_codes()
    assert torch.equal(codes, codes.round()) and torch.equal(layer.weight_scale, scale)
    up = codes - zero_point - torch.floor(layer.weight * scale.reciprocal())
    assert set(up.unique().tolist()) <= {0.0, 1.0}
    assert float((layer.weight_q - nearest_w).abs().div(scale).max()) <= 1.0 + 1e-5
    assert layer.rounding is None


def test_rounding_summary_by_hand() -> None:
    from modiff.quant.ptq.calibrate import rounding_summary

    records = [{"loss_nearest": 2.0, "loss_adaround": 1.0}, {"loss_nearest": 1.0, "loss_adaround": 1.5},
               {"loss_nearest": 4.0, "loss_adaround": 3.0}, {"loss_nearest": 0.0, "loss_adaround": 0.0}]
    assert rounding_summary(records) == {"units": 4, "units_lowered": 2, "median_loss_ratio": 0.75}


def test_block_reconstruction_on_a_tiny_unet(tiny_denoiser: md.Denoiser) -> None:
    """Blocks and lone layers in forward order; every layer ends with hard codes on its grid."""
    data = collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=4))
    wq = quantize(tiny_denoiser, md.presets["w4a32"])
    units = reconstruction_units(wq, data)
    names = [u.name for u in units]
    assert names[:3] == ["net.temb.dense.0", "net.temb.dense.1", "net.conv_in"] and names[-1] == "net.conv_out"
    assert "net.down.0.block.0" in names and "net.mid.attn_1" in names and "net.up.1.upsample" in names
    assert sum(len(u.layers) for u in units) == len(md.quant.quant_layers(wq))
    recipe = CalibrationConfig(AdaRoundConfig(iters=3, batch_size=4, log_every=3))
    qmodel, report = calibrate(tiny_denoiser, md.presets["w4a32"], data, recipe, progress=False)
    assert len(report["weights"]) == len(units) and report["units"] == len(units)
    for layer in md.quant.quant_layers(qmodel).values():
        codes = layer.weight_codes()
        assert torch.equal(layer.weight_q, (codes - layer.weight_zero_point) * layer.weight_scale)
        assert 0 <= float(codes.min()) and float(codes.max()) <= 15


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="beta decays"):
        AdaRoundConfig(beta_start=2.0, beta_end=20.0)
    with pytest.raises(ValueError, match=r"warmup is a fraction .* in \[0, 1\)"):
        AdaRoundConfig(warmup=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        AdaRoundConfig(init="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iters and batch_size must be >= 1"):
        AdaRoundConfig(iters=0)


def test_calibrate_reuses_given_weights_and_refuses_foreign_ones(tiny_denoiser: md.Denoiser) -> None:
    """calibrate(..., weights=) keeps the given AdaRound codes (no second reconstruction) and refuses weights
    calibrated for another weight quantization."""
    data = collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=4))
    recipe = CalibrationConfig(AdaRoundConfig(iters=3, batch_size=4, log_every=3))
    weights, report = calibrate_weights(tiny_denoiser, md.presets["w4a32"], data, recipe, progress=False)
    assert report["weights"] and report["seconds_weights"] >= 0
    qmodel, report = calibrate(tiny_denoiser, md.presets["w4a8"], data, recipe, progress=False, weights=weights)
    assert report["weights_reused"] and "weights" not in report
    given = md.quant.quant_layers(weights)
    for name, layer in md.quant.quant_layers(qmodel).items():
        assert torch.equal(layer.weight_codes(), given[name].weight_codes())
    with pytest.raises(ValueError, match="another weight quantization"):
        calibrate(tiny_denoiser, md.presets["w8a8"], data, recipe, progress=False, weights=weights)
