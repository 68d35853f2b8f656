"""Latent diffusion around the CompVis classes: loading, layer selection, quantized sampling, decoding."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import modiff
from analysis import layer_sensitivity
from modiff.cli import main
from modiff.diffusion.schedules import sqrt_linear_schedule
from modiff.models.denoisers import LatentDenoiser, to_images
from modiff.models.latent import compvis_module
from modiff.models.ldm import ema_key, ldm_modules_from_config
from modiff.models.registry import data_dir
from modiff.quant.api import select_layers
from modiff.quant.cost import compute_report
from modiff.quant.layers.direct import QuantLayer
from modiff.record.sites import select_sites
from modiff.pipelines.train import export_weights
from modiff.pipelines.train_ldm import AutoencoderTrainConfig, LatentUNetTrainConfig, LDMTrainConfig, reconstruction_error

TINY_LDM = LDMTrainConfig(
    autoencoder=AutoencoderTrainConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, iterations=4, batch_size=4),
    unet=LatentUNetTrainConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                               iterations=4, batch_size=4),
    image_size=16, warmup_iterations=2, checkpoint_every=2, compile=False, bf16=False, scale_images=32)
SCALE = 0.75
LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)


def _random_modules(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny UNet and KL autoencoder with every parameter perturbed (the UNet's zeroed output conv too)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet, first_stage, _ = ldm_modules_from_config(TINY_LDM.compvis_yaml())
        with torch.no_grad():
            for p in list(unet.parameters()) + list(first_stage.parameters()):
                p.add_(0.05 * torch.randn_like(p))
    return unet.eval(), first_stage.eval()


def _tiny_model(seed: int = 0) -> LatentDenoiser:
    unet, first_stage = _random_modules(seed)
    return LatentDenoiser(unet, first_stage, sqrt_linear_schedule(0.0015, 0.0155), "tiny-ldm", TINY_LDM.compvis_yaml(),
                          SCALE, (4, 4, 4)).eval()


def _fake_compvis_ckpt(folder: Path, ema: bool) -> tuple[Path, Path, LatentDenoiser, LatentDenoiser]:
    """A LatentDiffusion-layout .ckpt (weights under "state_dict", schedule buffers, optional model_ema.*) + YAML."""
    trained, averaged = _tiny_model(0), _tiny_model(1)
    state = compvis_module(trained.net, trained.first_stage, SCALE).state_dict()
    state.update(betas=trained.schedule.betas.clone(), alphas_cumprod=trained.schedule.alpha_bar.clone())
    if ema:
        state.update({ema_key(k): v for k, v in averaged.net.state_dict().items()})
        state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 5, "epoch": 1}, folder / "model.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(TINY_LDM.compvis_yaml()))
    return folder / "model.ckpt", folder / "config.yaml", trained, averaged


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("ema", [True, False])
def test_compvis_ckpt_round_trip(tmp_path: Path, ema: bool) -> None:
    """load_model(ckpt, config=yaml) builds a LatentDenoiser strictly: EMA UNet weights when present and
    use_ema (default), the trained ones with use_ema=False; the first stage and scale_factor as saved."""
    ckpt, config, trained, averaged = _fake_compvis_ckpt(tmp_path, ema)
    model = modiff.load_model(ckpt, config=config)
    assert isinstance(model, LatentDenoiser) and model.sample_shape == (4, 4, 4) and model.scale_factor == SCALE
    _assert_same_weights(model.net, averaged.net if ema else trained.net)
    _assert_same_weights(model.first_stage, trained.first_stage)
    _assert_same_weights(modiff.load_model(ckpt, config=config, use_ema=False).net, trained.net)
    expected = (np.linspace(0.0015**0.5, 0.0155**0.5, 1000, dtype=np.float64) ** 2).astype(np.float32)
    assert np.array_equal(model.schedule.betas.numpy(), expected)
    assert model.schedule.alpha_bar_at(-1) == pytest.approx(1 - expected[0], abs=1e-7)  # CompVis DDIM's last step


def test_compvis_mismatch_errors(tmp_path: Path) -> None:
    """A config that does not fit the weights names the mismatching keys; conditional/x0 models are refused."""
    ckpt, config, _, _ = _fake_compvis_ckpt(tmp_path, ema=False)
    other = TINY_LDM.compvis_yaml()
    other["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    with pytest.raises(ValueError, match=r"(?s)UNet.*wrong shapes \(143\)"):
        modiff.load_model(ckpt, config=other)
    x0 = TINY_LDM.compvis_yaml()
    x0["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ValueError, match="parameterization 'x0' is not supported"):
        modiff.load_model(ckpt, config=x0)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    del state["first_stage_model.decoder.conv_out.bias"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"(?s)first stage.*missing keys \(1\): decoder.conv_out.bias"):
        modiff.load_model(tmp_path / "broken.ckpt", config=config)


def test_only_the_unet_is_quantized_recorded_and_counted() -> None:
    """Quantization, recording sites and BOPs select layers under `net` only; the first stage stays fp."""
    model = _tiny_model()
    quant = modiff.presets["w4a4-modiff"]
    names = select_layers(model, quant)
    unet_layers = [n for n, m in model.net.named_modules(prefix="net") if isinstance(m, LAYERS)]
    assert names == unet_layers and names
    assert select_sites(model, "conv,linear") == unet_layers
    qmodel = modiff.quantize(model, quant)
    assert any(isinstance(m, LAYERS) for m in qmodel.first_stage.modules())
    assert not any(isinstance(m, QuantLayer) for m in qmodel.first_stage.modules())
    _assert_same_weights(qmodel.first_stage, model.first_stage)
    report = compute_report(qmodel, steps=10)
    assert report["layers_counted"] == len(unet_layers)
    unet_macs = compute_report(modiff.quantize(model, modiff.presets["fp"]), steps=10)["gmacs_conv_linear"]
    assert report["gmacs_conv_linear"] == unet_macs > 0
    unet_convs = [n for n, m in model.net.named_modules(prefix="net") if isinstance(m, torch.nn.Conv2d)]
    assert layer_sensitivity.edge_convolutions(model) == (unet_convs[0], unet_convs[-1])  # not the decoder's
    for config in layer_sensitivity.layer_variants(model, quant).values():
        modiff.quantize(model, config)  # each variant selects UNet layers


def test_quantized_ldm_sampling_decodes_to_images() -> None:
    """w4a4-modiff on the tiny LDM: DDIM (ldm spacing) in a trajectory, decoded: finite images of the right shape,
    and decode(z) = first_stage.decode(z / scale_factor) clamped to [-1, 1]."""
    model = _tiny_model()
    qmodel = modiff.quantize(model, modiff.presets["w4a4-modiff"])
    x_T = modiff.noise(range(3), model.sample_shape)
    with modiff.trajectory(qmodel):
        z0 = modiff.sample_ddim(qmodel, x_T, modiff.timesteps(5, "ldm"))
    images = to_images(qmodel, z0)
    assert z0.shape == (3, 4, 4, 4) and images.shape == (3, 1, 16, 16)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    with torch.no_grad():
        expected = model.first_stage.decode(z0 / SCALE).clamp(-1, 1)
    assert torch.allclose(images, expected)
    assert torch.equal(to_images(torch.nn.Identity(), z0), z0)  # pixel models pass through


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp_device_distance_decodes_each_output_with_its_own_copy() -> None:
    """Table 1's GPU-CPU distance on a latent model that an earlier run left on the GPU: the CPU output is
    decoded on the CPU and each GPU output on the GPU (decoding the CPU latents with the caller's GPU model
    raised a device mismatch on the H200)."""
    from analysis import table1

    model = _tiny_model().cuda()
    rows = table1.fp_device_distance(model, range(2), table1.table_config(model, 4))
    assert rows.gpu_precision.tolist() == ["fp32 (TF32 off)", "tf32", "bf16 autocast"] and (rows.n == 2).all()
    assert next(model.parameters()).is_cuda  # the caller's model stays where it was


def test_ddpm_leaves_latent_x0_pred_unclipped() -> None:
    """The DDPM sampler clips x0_pred to the pixel range [-1, 1] for pixel models only: a latent model's run is
    sample_ddpm with clip_denoised=False (the clamp had cut fmnist-ldm's latents)."""
    from modiff.diffusion.sampling import sample_ddpm
    from modiff.pipelines.generate import SampleConfig, sample
    from modiff.utils.rng import SeedStreams

    model = _tiny_model()
    config = SampleConfig(steps=4, sampler="ddpm", spacing="ldm")
    ts = modiff.timesteps(4, "ldm", model.schedule.num_timesteps)
    with torch.no_grad():
        run = sample(model, range(2), config, torch.device("cpu"))
        outputs = []
        for clip in (False, True):
            rng = SeedStreams(range(2))  # x_T first, then the steps' noise, from each seed's stream as `sample` draws
            outputs.append(sample_ddpm(model, rng.randn(model.sample_shape), ts, rng=rng, clip_denoised=clip))
    unclipped, clipped = outputs
    assert model.clip_denoised is False and torch.equal(run, unclipped) and not torch.equal(run, clipped)


def test_latent_ddpm_runs_record_unclipped_x0(tmp_path: Path) -> None:
    """A latent model's DDPM run records ``ddpm_clip_denoised: False`` in its model identity, so a run made
    before the fix (clipped, no field) is refused rather than continued or reused; DDIM runs of the same model
    and pixel models' DDPM runs keep the identity they had."""
    from modiff.pipelines.generate import SampleConfig, finished_run, generate
    from modiff.pipelines.run_folder import sampler_identity

    model = _tiny_model()
    ddpm = SampleConfig(steps=2, sampler="ddpm", spacing="ldm")
    run = generate(model, [0], tmp_path / "run", ddpm, batch_size=1, device="cpu", identity={"model": "tiny"},
                   progress=False)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"]["model"] == {"model": "tiny", "ddpm_clip_denoised": False}
    assert finished_run(run, [0], ddpm, {"model": "tiny", **sampler_identity(model, "ddpm")}, "cpu")
    del manifest["identity"]["model"]["ddpm_clip_denoised"]  # as a run made before commit 68f5759 recorded it
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"another configuration .*model\.ddpm_clip_denoised: None -> False"):
        generate(model, [0, 1], run, ddpm, batch_size=1, device="cpu", identity={"model": "tiny"}, progress=False)
    assert sampler_identity(model, "ddim") == {}
    assert sampler_identity(torch.nn.Identity(), "ddpm") == {}  # pixel models clip (`Denoiser.clip_denoised`)


def test_encode_applies_scale_factor() -> None:
    """encode(x) = scale_factor * posterior mode; with a generator, a posterior sample."""
    model = _tiny_model()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.first_stage.encode(x)
    assert torch.allclose(model.encode(x), SCALE * posterior.mean)
    sampled = model.encode(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, SCALE * posterior.mean)


def test_sample_cli_on_exported_ldm(tmp_path: Path) -> None:
    """`modiff sample --model <exported LDM folder> --preset w4a4-modiff` writes decoded 16x16 images, with the
    model's timestep spacing (ldm) when none is given."""
    model = _tiny_model()
    export_weights(compvis_module(model.net, model.first_stage, SCALE), TINY_LDM.compvis_yaml(), tmp_path / "tiny-ldm")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "tiny-ldm"), "--preset", "w4a4-modiff",
                                       "--seeds", "0-2", "--steps", "4", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as data:
        assert data["images"].shape == (3, 16, 16, 1) and data["images"].dtype == np.uint8
    assert '"spacing": "ldm"' in (out / "manifest.json").read_text()


@pytest.mark.parametrize("command", [["record", "--sites", "net.middle_block.*"],
                                     ["calibrate-data", "--calib-steps", "2", "--samples-per-step", "2"]])
def test_record_and_calibration_data_follow_the_model_spacing(tmp_path: Path, command: list[str]) -> None:
    """`modiff record` and `modiff calibrate-data` on a latent model sample with its ldm timesteps by default."""
    model = _tiny_model()
    export_weights(compvis_module(model.net, model.first_stage, SCALE), TINY_LDM.compvis_yaml(), tmp_path / "tiny-ldm")
    seeds = ["--seeds", "0-1"] if command[0] == "record" else []
    result = CliRunner().invoke(main, [*command, "--model", str(tmp_path / "tiny-ldm"), "--steps", "4", *seeds,
                                       "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert '"spacing": "ldm"' in (tmp_path / "out" / "manifest.json").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not (data_dir() / "fmnist-ldm" / "manifest.json").exists(), reason="data/fmnist-ldm not trained yet")
def test_fmnist_ldm_reconstruction_matches_manifest() -> None:
    """Encode-decode of real Fashion-MNIST test images reproduces the error recorded at training time (on all
    10,000; here the first 500, whose mean is within a few standard errors of it)."""
    from modiff.datasets import fashion_mnist

    recorded = json.loads((data_dir() / "fmnist-ldm" / "manifest.json").read_text())["reconstruction_test"]
    images = fashion_mnist("test")[0][:500]
    measured = reconstruction_error(modiff.load_model("fmnist-ldm"), images)
    assert recorded["num_images"] == 10_000 and measured["num_images"] == 500
    assert measured["mse"] == pytest.approx(recorded["mse"], rel=0.15)
    assert measured["psnr_db"] > 20 and math.isfinite(measured["psnr_db"])


def test_shipped_calibration_of_an_exported_ldm(tmp_path: Path) -> None:
    """`modiff calibrate-shipped` on a latent model (ldm spacing, the CompVis UNet's split layers), then
    `modiff sample` with the static and the dynamic AdaRound preset from what it wrote."""
    model = _tiny_model()
    folder = tmp_path / "tiny-ldm"
    export_weights(compvis_module(model.net, model.first_stage, SCALE), TINY_LDM.compvis_yaml(), folder)
    fast = ["--set", "adaround.iters=2", "--set", "adaround.batch_size=4", "--set", "activations.iters=2",
            "--set", "activations.batch_size=4", "--set", "capture_batch=4"]
    result = CliRunner().invoke(main, ["calibrate-shipped", "--model", str(folder), "--steps", "4", "--calib-steps", "2",
                                       "--samples-per-step", "4", *fast, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert '"spacing": "ldm"' in (folder / "calibration" / "calib-data" / "manifest.json").read_text()
    for preset in ("qdiff-w4a4-modiff", "w4a4-adaround-modiff"):
        out = tmp_path / preset
        sampled = CliRunner().invoke(main, ["sample", "--model", str(folder), "--preset", preset, "--seeds", "0-1",
                                            "--steps", "4", "--device", "cpu", "--out", str(out)])
        assert sampled.exit_code == 0, sampled.output
        with np.load(out / "samples.npz") as data:
            assert data["images"].shape == (2, 16, 16, 1)
