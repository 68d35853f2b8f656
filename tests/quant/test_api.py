"""quantize(), layer selection, presets, split shortcut, static calibration, attention, BOPs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import modiff as md
from modiff.cli import main
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig, ddim_unet_from_config
from modiff.quant import ActQuant, QuantConfig, QuantSpec, WeightQuant, presets, quantize, select_layers, trajectory
from modiff.quant.cost import bops_table, measure_macs, modiff_state_bytes
from modiff.quant.ptq.data import CalibDataConfig, collect_calib_data
from modiff.quant.ptq.calibrate import observe_activations
from modiff.quant.layers.direct import QuantAttentionCore, QuantLayer, quantize_weight
from modiff.models.ddim_unet import AttentionCore


def test_quantize_returns_copy_and_leaves_fp_untouched(tiny_denoiser: md.Denoiser) -> None:
    before = {k: v.clone() for k, v in tiny_denoiser.state_dict().items()}
    qmodel = quantize(tiny_denoiser, presets["w4a4"])
    assert not any(isinstance(m, QuantLayer) for m in tiny_denoiser.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_denoiser.state_dict().items())
    assert sum(isinstance(m, QuantLayer) for m in qmodel.modules()) == len(select_layers(tiny_denoiser, presets["w4a4"]))


@pytest.mark.parametrize("config", [presets["qdiff-w4a4"], presets["w8a4-modiff"], presets["w8a8-int8-modiff-real"],
                                    dataclasses.replace(presets["w8a8"], quantize_attention=True)],
                         ids=["qdiff-w4a4", "w8a4-modiff", "w8a8-int8-modiff-real", "w8a8-attention"])
def test_quantized_layers_land_on_the_models_device(tiny_denoiser: md.Denoiser, config: QuantConfig) -> None:
    """A model already on an accelerator (calibration quantizes one there) gets its quantizers' grid buffers,
    made on the CPU, beside its weights ("meta" stands in for the GPU here); attention cores included."""
    qmodel = quantize(tiny_denoiser.to("meta"), config)
    assert any(isinstance(m, QuantAttentionCore) for m in qmodel.modules()) == config.quantize_attention
    assert {t.device.type for t in [*qmodel.parameters(), *qmodel.buffers()]} == {"meta"}


def test_cifar10_unet_has_113_quantizable_layers() -> None:
    """Every Conv2d/Linear of the CIFAR-10 UNet is selected, as in the published MoDiff code."""
    with torch.device("meta"):
        net = ddim_unet_from_config({"model": {"ch": 128, "out_ch": 3, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                                               "attn_resolutions": [16], "in_channels": 3},
                                     "data": {"image_size": 32}})
    assert len(select_layers(net, presets["w8a8"])) == 113


def test_layer_selection_by_pattern(tiny_denoiser: md.Denoiser) -> None:
    config = QuantConfig(include=("net.down.*",), exclude=("*.temb_proj",))
    names = select_layers(tiny_denoiser, config)
    assert names and all(n.startswith("net.down.") and not n.endswith("temb_proj") for n in names)
    with pytest.raises(ValueError, match="no layer matched"):
        quantize(tiny_denoiser, QuantConfig(include=("nothing.*",)))


def test_static_presets_by_shell_pattern() -> None:
    """`modiff calibrate-shipped --preset 'qdiff-*'`: patterns expand to the presets needing calibration (table
    order, duplicates once), plain names pass as given (the caller refuses a dynamic one), an empty match raises."""
    from modiff.quant.presets import expand_static

    everything = expand_static(["qdiff-*"])
    assert len(everything) == 20 and everything[:2] == ["qdiff-w8a8", "qdiff-w8a8-modiff"]
    assert expand_static(["qdiff-w4a?", "qdiff-w4a4", "w8a4"]) == [f"qdiff-w4a{a}" for a in (8, 6, 4, 3, 2)] + ["w8a4"]
    with pytest.raises(ValueError, match="matches no preset that needs calibration; those are: qdiff-w8a8"):
        expand_static(["w8a*"])
    result = CliRunner().invoke(main, ["calibrate-shipped", "--preset", "qdiff-w9*"])
    assert result.exit_code != 0 and "'qdiff-w9*' matches no preset" in result.output


def test_presets_and_unknown_name() -> None:
    for w in (8, 4):
        for a in (8, 6, 4, 3, 2):
            for suffix in ("", "-modiff", "-modiff-noec"):
                assert f"w{w}a{a}{suffix}" in presets
            assert f"published-w{w}a{a}" in presets and f"published-w{w}a{a}-modiff" in presets
    assert presets["w4a4-modiff"].mode == "modulated" and presets["w4a4-modiff"].compensation
    assert not presets["w4a4-modiff-noec"].compensation
    published = presets["published-w4a4-modiff"]
    assert published.activation.spec.scheme == "symmetric-published"
    assert published.activation.spec.granularity == "tensor" and published.split_shortcut
    assert published.samples_per_scale == published.activation.spec.samples_per_scale == 64  # the published batch
    assert presets["w8a4"].samples_per_scale == presets["qdiff-w8a4"].samples_per_scale == 0
    assert QuantConfig.from_dict(published.to_dict()) == published
    assert "samples_per_scale" not in str(presets["w8a4"].to_dict())  # configs recorded before keep their form
    with pytest.raises(ValueError, match="weights have none"):
        WeightQuant(QuantSpec(bits=8, granularity="tensor", samples_per_scale=2))
    with pytest.raises(KeyError, match="valid presets: fp, w8a32"):
        presets["w5a5"]


@pytest.mark.parametrize("name", ["fp", "w8a8", "w4a4-modiff", "w8a3-modiff-noec", "published-w4a4-modiff", "cache3"])
def test_presets_sample_finite(tiny_denoiser: md.Denoiser, name: str) -> None:
    qmodel = quantize(tiny_denoiser, presets[name])
    x_T = md.noise(range(2), tiny_denoiser.sample_shape)
    if presets[name].stateful:
        with trajectory(qmodel):
            out = md.sample_ddim(qmodel, x_T, md.timesteps(4))
    else:
        out = md.sample_ddim(qmodel, x_T, md.timesteps(4))
    assert torch.isfinite(out).all()


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="mode must be one of fp, direct, modulated, cache"):
        QuantConfig(mode="magic")
    with pytest.raises(ValueError, match="cache_interval"):
        QuantConfig(mode="cache")
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        QuantConfig(mode="modulated", warmup_steps=0)
    with pytest.raises(ValueError, match="0 bits"):
        WeightQuant(QuantSpec(bits=0))
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize(nn.Linear(2, 2), "w4a4")


@pytest.mark.parametrize("mode", ["direct", "modulated"])
def test_activation_bits_0_belong_to_cache_mode(mode: str) -> None:
    """0 activation bits (Q = 0) outside mode 'cache' zeroed every input and sampled garbage: refused."""
    with pytest.raises(ValueError, match=f"activation bits 0 .*mode '{mode}'.*mode 'cache' alone"):
        QuantConfig(activation=ActQuant(QuantSpec(bits=0)), mode=mode)


def test_weights_quantized_once_per_output_channel() -> None:
    """weight_q is computed at quantize() time: per output channel, at most 2^b levels each."""
    layer = QuantLayer(nn.Conv2d(4, 6, 3), presets["w4a8"], "c")
    for w in layer.weight_q:
        assert len(torch.unique(w)) <= 16
    before = layer.weight_q.clone()
    layer(torch.randn(2, 4, 8, 8))
    assert torch.equal(layer.weight_q, before)


def test_split_shortcut_quantizes_halves_separately(tiny_denoiser: md.Denoiser) -> None:
    """Split layers get two qparam sets: a half with a 100x smaller range keeps its resolution."""
    splits = tiny_denoiser.net.concat_splits()
    assert "up.1.block.1.nin_shortcut" in splits and "up.0.block.0.conv1" not in splits
    spec = QuantSpec(bits=4, granularity="tensor")
    layer = QuantLayer(nn.Conv2d(8, 2, 1), QuantConfig(activation=ActQuant(spec), split_shortcut=True), "c", split=4)
    x = torch.cat([100 * torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)], dim=1)
    q = layer.act(x)
    assert (q[:, 4:] - x[:, 4:]).abs().max() < 0.5  # one scale for both halves would round it all to ~0
    w = torch.cat([10 * torch.randn(3, 2, 1, 1), torch.randn(3, 2, 1, 1)], dim=1)
    wq = quantize_weight(w, WeightQuant(QuantSpec(bits=4, granularity="channel", channel_axis=0)), split=2)
    torch.testing.assert_close(wq[:, 2:], quantize_weight(w[:, 2:], WeightQuant(QuantSpec(bits=4, granularity="channel", channel_axis=0))))


@torch.no_grad()
def test_per_tensor_scales_depend_on_the_batch(tiny_denoiser: md.Denoiser) -> None:
    """Sample 0's output depends on its batch-mates with per-tensor scales, not with per-sample ones."""
    x = torch.randn(4, 1, 16, 16)
    x2 = torch.cat([x[:1], 5 * torch.randn(3, 1, 16, 16)])
    t = torch.full((4,), 500)
    change = {}
    for name in ("published-w8a4", "w8a4"):
        q = quantize(tiny_denoiser, presets[name])
        ref = q(x, t)[0]
        change[name] = float((q(x2, t)[0] - ref).norm() / ref.norm())
    assert change["w8a4"] < 1e-3 < 0.05 < change["published-w8a4"], change


def test_static_calibration_path(tiny_denoiser: md.Denoiser) -> None:
    """Static min-max qparams from fp trajectories; uncalibrated static layers refuse to run."""
    static = ActQuant(QuantSpec(bits=8, granularity="tensor"), dynamic=False)
    qmodel = quantize(tiny_denoiser, QuantConfig(weight=None, activation=static))
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(6)
    with pytest.raises(RuntimeError, match="calibrate"):
        md.sample_ddim(qmodel, x_T, ts)
    data = collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=3, samples_per_step=4))
    assert len(data) == 12 and data.x.shape == (12, 1, 16, 16)
    observe_activations(qmodel, data)
    x, t = data.x[4:8].float(), data.t[4:8]
    ref = tiny_denoiser(x, t)
    assert (qmodel(x, t) - ref).norm() / ref.norm() < 0.1
    modulated = quantize(tiny_denoiser, QuantConfig(weight=None, activation=static, mode="modulated"))
    observe_activations(modulated, data)
    with trajectory(modulated):
        out = md.sample_ddim(modulated, x_T, ts)
    assert torch.isfinite(out).all()


def test_quantized_attention_core_matches_at_16_bits() -> None:
    q, k, v = (torch.randn(2, 8, 4, 4) for _ in range(3))
    torch.testing.assert_close(QuantAttentionCore(16)(q, k, v), AttentionCore()(q, k, v), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(QuantAttentionCore(3)(q, k, v), AttentionCore()(q, k, v), atol=1e-3)


class _Tiny(nn.Module):
    """conv 2->3 (3x3, pad 1) on 4x4, then a linear 48->5: hand-countable MACs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_bops_by_hand() -> None:
    """MACs: conv 3*4*4 outputs x 2*3*3 = 864, linear 5 x 48 = 240; BOPs = MACs x 8 x 4 per step;
    over 10 steps with one fp warm-up step: MACs x 8 x (32 + 9 x 4); state = (in + out) x 4 bytes."""
    model = quantize(_Tiny(), QuantConfig(weight=WeightQuant(QuantSpec(bits=8, granularity="channel", channel_axis=0)),
                                          activation=ActQuant(QuantSpec(bits=4, granularity="sample")), mode="modulated"))
    costs, attention = measure_macs(model, torch.zeros(1, 2, 4, 4), torch.zeros(1, dtype=torch.long))
    assert [(c.name, c.macs) for c in costs] == [("conv", 864), ("fc", 240)] and attention == 0
    rows = bops_table(model, costs, steps=10)
    assert [r["bops_per_step"] for r in rows] == [864 * 32, 240 * 32]
    assert rows[0]["bops_per_trajectory"] == 864 * 8 * (32 + 9 * 4)
    assert modiff_state_bytes(model, costs) == ((32 + 48) + (48 + 5)) * 4


def test_cli_presets_and_bops(tmp_path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["presets"])
    assert result.exit_code == 0 and "w4a4-modiff" in result.output and "symmetric-published" in result.output
    result = runner.invoke(main, ["bops", "--preset", "nope"])
    assert result.exit_code != 0 and "valid presets" in result.output
    result = runner.invoke(main, ["bops", "--preset", "qdiff-w4a4", "--steps", "10"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gbops_per_step"] > 0


def test_bops_of_a_static_preset_need_no_calibration(tiny_denoiser) -> None:
    """BOPs depend on the layers and bit widths alone: a Q-Diffusion preset is counted like the dynamic
    preset of the same bits, without calibrating it (measuring it on its own forward would need qparams)."""
    from modiff.quant.cost import compute_report, preset_report

    model = tiny_denoiser
    static, dynamic = preset_report(model, presets["qdiff-w4a4"], 10), preset_report(model, presets["w4a4"], 10)
    assert static["gbops_per_step"] == dynamic["gbops_per_step"] > 0
    assert dynamic == compute_report(quantize(model, presets["w4a4"]), 10)
    with pytest.raises(RuntimeError, match="no qparams"):
        compute_report(quantize(model, presets["qdiff-w4a4"]), 10)


@pytest.mark.parametrize("preset", ["fp", "w8a32", "w8a4-modiff", "w4a4-modiff-noec", "published-w8a4-modiff",
                                    "published-lsun-w4a4", "cache5", "w8a8-int8-modiff-real", "w4a4-adaround-modiff"])
def test_a_preset_is_counted_as_its_quantized_model_without_quantizing(tiny_denoiser, preset: str) -> None:
    """`preset_report` counts on the full-precision model (the selected layers with the preset's config): the same
    report, every layer's row included, as the quantized model's own (its MACs measured by its own forward)."""
    from modiff.quant.cost import compute_report, preset_report

    quantized = quantize(tiny_denoiser, presets[preset].with_weight_codes("nearest"))
    assert preset_report(tiny_denoiser, presets[preset], 10) == compute_report(quantized, 10)


def test_layers_a_preset_leaves_out_are_counted_in_full_precision(tiny_denoiser) -> None:
    from modiff.models.conventions import edge_layers
    from modiff.quant.cost import compute_report, preset_report

    config = dataclasses.replace(presets["w8a4-modiff"], exclude=tuple(edge_layers(tiny_denoiser)))
    report = preset_report(tiny_denoiser, config, 10)
    assert report == compute_report(quantize(tiny_denoiser, config), 10)
    assert {r["layer"]: r["act_bits"] for r in report["layers"]}[edge_layers(tiny_denoiser)[0]] == 32


def test_cifar10_unet_counts_give_the_papers_gbops() -> None:
    """The CIFAR-10 DDIM UNet (ch 128, the official checkpoint's shape; weights do not matter for counts): 6.054
    GMAC in its 113 Conv/Linear layers and 0.168 G in the attention matmuls; with the attention counted twice,
    the paper's 1636 GBops at W8A32 and 153 at W8A3 per image per step (README, `modiff.quant.cost`); the weights
    of those layers in MB at fp32, 8 and 4 bits."""
    from modiff.quant.cost import compute_report, preset_report

    net = md.Denoiser(DDIMUNet(DDIMUNetConfig(ch=128, in_channels=3, out_ch=3)),
                      md.linear_schedule(), "cifar10", {})
    report = compute_report(net, steps=100)
    assert report["layers_counted"] == 113
    assert round(report["gmacs_conv_linear"], 3) == 6.054 and round(report["gmacs_attention_matmuls"], 3) == 0.168
    assert round(report["gmacs_paper_convention"] * 8 * 32, 1) == 1635.8
    assert round(report["gmacs_paper_convention"] * 8 * 3, 1) == 153.4
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert report["weight_mb_fp32"] == weights * 4 / 1e6 == report["weight_mb"] and round(weights / 1e6, 2) == 35.69
    for preset, bytes_per_weight in (("w8a8-int8-real", 1), ("w4a8-int8-modiff-real", 0.5)):
        assert preset_report(net, presets[preset], 100)["weight_mb"] == weights * bytes_per_weight / 1e6
