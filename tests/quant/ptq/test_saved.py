"""Saving and loading calibrated models: identical outputs, compact codes, config round trip, errors, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import modiff as md
from modiff.cli import main
from modiff.cli.calibrate import apply_overrides
from modiff.quant import QuantConfig, QuantSpec, presets, quantize
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.data import CalibDataConfig, collect_calib_data
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.ptq.saved import code_dtype, load_quantized, read_manifest, save_quantized
from safetensors.torch import load_file
from modiff.pipelines.train import DDIMTrainConfig, export_weights

from conftest import TINY, tiny_net

FAST = CalibrationConfig(AdaRoundConfig(iters=4, batch_size=4, log_every=2), ActCalibConfig(iters=4, batch_size=4, log_every=2))


@pytest.fixture
def data(tiny_denoiser: md.Denoiser) -> md.quant.CalibData:
    return collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=4))


@pytest.mark.parametrize("preset", ["qdiff-w4a4", "qdiff-w4a4-modiff"])
def test_round_trip_gives_identical_outputs(tiny_denoiser: md.Denoiser, data: md.quant.CalibData, tmp_path: Path,
                                            preset: str) -> None:
    qmodel, report = calibrate(tiny_denoiser, presets[preset], data, FAST, progress=False)
    save_quantized(qmodel, tmp_path / "q", metadata={"report": report})
    loaded = load_quantized(tiny_denoiser, tmp_path / "q")
    assert loaded.quant_config == qmodel.quant_config
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(4)
    outputs = []
    for model in (qmodel, loaded):
        with md.trajectory(model) if model.quant_config.stateful else torch.no_grad():
            outputs.append(md.sample_ddim(model, x_T, ts))
    assert torch.equal(outputs[0], outputs[1])
    for name, layer in md.quant.quant_layers(loaded).items():
        assert torch.equal(layer.weight_q, md.quant.quant_layers(qmodel)[name].weight_q)


def test_codes_are_stored_compactly(tiny_denoiser: md.Denoiser, data: md.quant.CalibData, tmp_path: Path) -> None:
    assert code_dtype(QuantSpec(bits=4)) == torch.int8 and code_dtype(QuantSpec(bits=8)) == torch.uint8
    assert code_dtype(QuantSpec(bits=8, scheme="symmetric-published")) == torch.int8
    assert code_dtype(QuantSpec(bits=12)) == torch.int16 and code_dtype(QuantSpec(bits=16)) == torch.int32
    from safetensors.torch import load_file

    save_quantized(quantize(tiny_denoiser, presets["w4a8"]), tmp_path / "w4")
    saved = load_file(tmp_path / "w4" / "quantized.safetensors")
    codes = saved["net.conv_in.weight_code"]
    assert codes.dtype == torch.int8 and 0 <= int(codes.min()) and int(codes.max()) <= 15
    assert not any(".act_" in k for k in saved)  # dynamic activations have no qparams to save


def test_config_round_trip_for_every_preset() -> None:
    for name, config in presets.items():
        assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config, name
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"bits": 4})


def test_errors(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uncalibrated static activation quantizer"):
        save_quantized(quantize(tiny_denoiser, presets["qdiff-w4a4"]), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="modiff calibrate"):
        load_quantized(tiny_denoiser, tmp_path / "nothing")
    save_quantized(quantize(tiny_denoiser, presets["w4a8"]), tmp_path / "b")
    with pytest.raises(ValueError, match="already holds a saved model"):
        save_quantized(quantize(tiny_denoiser, presets["w4a8"]), tmp_path / "b")
    other = md.Denoiser(tiny_net(0, TINY.__class__(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                                                   in_channels=1, out_ch=1, image_size=16)), md.linear_schedule(), "o", {})
    with pytest.raises(ValueError, match="holds layers the model lacks"):
        load_quantized(other, tmp_path / "b")
    with pytest.raises(ValueError, match="calibration supports modes"):
        calibrate(tiny_denoiser, presets["cache2"], collect_calib_data(tiny_denoiser, CalibDataConfig(steps=3, calib_steps=1, samples_per_step=1)))


def test_recipe_overrides() -> None:
    recipe = apply_overrides(CalibrationConfig(), ("adaround.iters=200", "activations.learn=false", "capture_batch=64"))
    assert recipe.weights.iters == 200 and not recipe.activations.learn and recipe.capture_batch == 64
    assert apply_overrides(CalibrationConfig(), ("weights=none",)).weights is None
    with pytest.raises(ValueError, match="unknown key 'iterz'"):
        apply_overrides(CalibrationConfig(), ("adaround.iterz=3",))
    with pytest.raises(ValueError, match="expected a int"):
        apply_overrides(CalibrationConfig(), ("adaround.iters=many",))


def test_cli_calibrate_data_calibrate_and_sample(tmp_path: Path) -> None:
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    model = str(tmp_path / "tiny")
    run = CliRunner().invoke
    result = run(main, ["calibrate-data", "--model", model, "--steps", "4", "--calib-steps", "2", "--samples-per-step",
                        "4", "--device", "cpu", "--out", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    result = run(main, ["sample", "--model", model, "--preset", "qdiff-w4a4", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "modiff calibrate-data" in result.output
    result = run(main, ["calibrate", "--model", model, "--data", str(tmp_path / "data"), "--preset", "qdiff-w8a8",
                        "--modiff", "--set", "adaround.iters=2", "--set", "activations.iters=2", "--device", "cpu",
                        "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["metadata"]["preset"] == "qdiff-w8a8-modiff"
    assert manifest["metadata"]["calibration"]["weights"]["iters"] == 2
    units = manifest["metadata"]["report"]["adaround_vs_nearest"]["units"]
    assert f"of {units} units against round-to-nearest" in result.output
    result = run(main, ["sample", "--model", model, "--quantized", str(tmp_path / "q"), "--steps", "3", "--seeds", "0-1",
                        "--device", "cpu", "--out", str(tmp_path / "samples")])
    assert result.exit_code == 0, result.output
    sampled = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert sampled["identity"]["model"]["quant_config"]["mode"] == "modulated"
    result = run(main, ["calibrate", "--model", model, "--data", str(tmp_path / "data"), "--preset", "qdiff-w8a4",
                        "--weights-from", str(tmp_path / "q"), "--set", "activations.iters=2", "--device", "cpu",
                        "--out", str(tmp_path / "q-direct")])
    assert result.exit_code == 0, result.output
    reused = read_manifest(tmp_path / "q-direct")["metadata"]
    assert reused["report"]["weights_reused"] and reused["weights_from"] == str(tmp_path / "q")
    codes = load_file(str(tmp_path / "q" / "quantized.safetensors"))
    again = load_file(str(tmp_path / "q-direct" / "quantized.safetensors"))
    assert all(torch.equal(v, again[k]) for k, v in codes.items() if k.endswith("weight_code"))
    result = run(main, ["calibrate", "--model", model, "--data", str(tmp_path / "data"), "--preset", "qdiff-w4a4",
                        "--weights-from", str(tmp_path / "q"), "--device", "cpu", "--out", str(tmp_path / "q-w4")])
    assert result.exit_code == 1 and "another weight quantization" in result.output


def test_a_folder_with_another_split_set_is_refused(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    """A folder saved while conv1 was split as well (before the published split set was fixed) holds a split
    weight grid and two activation scales for conv1: loading it says so instead of misreading them."""
    from modiff.quant.layers.direct import weight_grid

    conv1, split = "net.up.0.block.0.conv1", tiny_denoiser.net.concat_splits()["up.0.block.0.nin_shortcut"]
    qmodel = quantize(tiny_denoiser, presets["qdiff-w4a4"])
    for layer in md.quant.quant_layers(qmodel).values():
        parts = 1 if layer.split is None else 2
        layer.act.scales = [torch.tensor(0.1) for _ in range(parts)]
        layer.act.zero_points = [torch.tensor(0.0) for _ in range(parts)]
    layer = md.quant.quant_layers(qmodel)[conv1]
    scale, zero_point = weight_grid(layer.weight, layer.config.weight, split)
    layer.set_weight_codes(layer.weight_codes(), scale, zero_point)
    save_quantized(qmodel, tmp_path / "weights")
    with pytest.raises(ValueError, match=rf"{conv1} was saved with a weight grid of shape \(32, 96, 1, 1\)"):
        load_quantized(tiny_denoiser, tmp_path / "weights")
    layer.set_weight_codes(layer.weight_codes(), *weight_grid(layer.weight, layer.config.weight))
    layer.act.scales, layer.act.zero_points = [torch.tensor(0.1), torch.tensor(0.2)], [torch.zeros(()), torch.zeros(())]
    save_quantized(qmodel, tmp_path / "acts")
    with pytest.raises(ValueError, match=f"{conv1} was saved with a different number of activation scales"):
        load_quantized(tiny_denoiser, tmp_path / "acts")


def _static_quantizers(model: torch.nn.Module) -> list:
    from modiff.quant.layers.direct import ActQuantizer

    return [m for m in model.modules() if isinstance(m, ActQuantizer) and not m.config.dynamic]


@pytest.mark.parametrize("preset", ["qdiff-w4a4", "qdiff-w4a4-modiff"])
def test_a_loaded_model_is_static(tiny_denoiser: md.Denoiser, data: md.quant.CalibData, tmp_path: Path,
                                  preset: str) -> None:
    """The activation qparams of a loaded model move with `.to()` (they used to stay behind and move on the
    first call, inside whatever a compiled network or a CUDA graph was recording: `modiff sample --quantized
    RUN --cuda-graphs` crashed), keep float32, and no call replaces any tensor the network reads."""
    qmodel, _ = calibrate(tiny_denoiser, presets[preset], data, FAST, progress=False)
    save_quantized(qmodel, tmp_path / "q")
    moved = load_quantized(tiny_denoiser, tmp_path / "q").to("meta")
    qparams = [t for q in _static_quantizers(moved) for t in (*q.scales, *q.zero_points)]
    assert qparams and all(t.device.type == "meta" for t in qparams)
    halved = load_quantized(tiny_denoiser, tmp_path / "q").half()
    assert all(s.dtype == torch.float32 for q in _static_quantizers(halved) for s in q.scales)

    loaded = load_quantized(tiny_denoiser, tmp_path / "q")

    def read_by_calls() -> list[int]:
        tensors = [*loaded.parameters(), *loaded.buffers()]
        return [id(t) for t in tensors] + [id(t) for q in _static_quantizers(loaded) for t in (*q.scales, *q.zero_points)]

    before = read_by_calls()
    with md.trajectory(loaded):
        md.sample_ddim(loaded, md.noise(range(2), loaded.sample_shape), md.timesteps(3))
    assert read_by_calls() == before


def test_qparams_on_another_device_than_the_input_are_an_error(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, presets["qdiff-w4a4"])
    for quantizer in _static_quantizers(qmodel):
        quantizer.scales = [torch.tensor(0.1, device="meta") for _ in quantizer.observers]
        quantizer.zero_points = [torch.tensor(0.0, device="meta") for _ in quantizer.observers]
    with pytest.raises(RuntimeError, match=r"qparams are on meta, the input on cpu: move the model with \.to\(device\)"):
        md.sample_ddim(qmodel, md.noise(range(1), qmodel.sample_shape), md.timesteps(2))
