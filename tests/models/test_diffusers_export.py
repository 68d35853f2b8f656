"""The DDIM UNet exported as a diffusers folder, diffusers folders loaded offline, and the command line on
diffusers models (export-diffusers, sample with prompts, bops)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import modiff as md  # noqa: E402
from modiff.cli import main  # noqa: E402
from modiff.diffusion.schedules import linear_schedule  # noqa: E402
from modiff.models.diffusers.convert import ddim_unet_to_diffusers, export_diffusers  # noqa: E402
from modiff.models.diffusers.tiny import tiny_text_to_image  # noqa: E402
from modiff.models.registry import data_dir  # noqa: E402

from conftest import official_yaml, tiny_net  # noqa: E402
from tiny_diffusers import ddim_scheduler, tiny_unet2d  # noqa: E402

HAS_FMNIST = (data_dir() / "fmnist-ddim" / "config.yaml").is_file()


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def _eps_pair(a: torch.nn.Module, b: torch.nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, *shape, generator=generator), torch.tensor([0, 417, 999])
    with torch.no_grad():
        return a(x, t), b(x, t)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_text_to_image(seed=1).save_pretrained(folder)
    return folder


# ---- the DDIM UNet as a UNet2DModel ---------------------------------------------------------------


def test_converted_unet_computes_the_same_eps() -> None:
    net = tiny_net(3)
    unet = ddim_unet_to_diffusers(net)
    ours, theirs = _eps_pair(net, lambda x, t: unet(x, t).sample, net.sample_shape)
    _close(theirs, ours)


def test_export_roundtrip_keeps_eps_schedule_and_samples(tmp_path: Path) -> None:
    model = md.Denoiser(tiny_net(1), linear_schedule(), "tiny", official_yaml()).eval()
    export_diffusers(model, tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["model_index.json", "scheduler", "unet"]
    loaded = md.load_model(tmp_path / "pipe")
    assert torch.equal(loaded.schedule.alpha_bar, model.schedule.alpha_bar) and loaded.schedule.final_alpha_bar == 1.0
    _close(*reversed(_eps_pair(model, loaded, model.sample_shape)))
    ts = md.timesteps(5, md.default_spacing(loaded))
    assert ts == md.timesteps(5, "uniform")
    x_T = md.noise(range(2), model.sample_shape)
    _close(md.sample_ddim(loaded, x_T, ts), md.sample_ddim(model, x_T, ts))
    with pytest.raises(ValueError, match="not empty"):
        export_diffusers(model, tmp_path / "pipe")


@pytest.mark.skipif(not HAS_FMNIST, reason="the shipped fmnist-ddim weights are not in the repository")
def test_fmnist_ddim_exports_with_equal_eps(tmp_path: Path) -> None:
    result = _invoke("export-diffusers", "--model", "fmnist-ddim", "--out", str(tmp_path / "fmnist"))
    assert result.exit_code == 0, result.output
    from diffusers import DDIMPipeline, UNet2DModel

    unet = UNet2DModel.from_pretrained(tmp_path / "fmnist" / "unet", local_files_only=True)
    fp = md.load_model("fmnist-ddim")
    ours, theirs = _eps_pair(fp, lambda x, t: unet(x, t).sample, fp.sample_shape)
    _close(theirs, ours)
    assert type(DDIMPipeline.from_pretrained(tmp_path / "fmnist", local_files_only=True).unet).__name__ == "UNet2DModel"


def test_only_ddim_unets_export(tmp_path: Path) -> None:
    wrapped = md.load_model(tiny_unet2d(), scheduler=ddim_scheduler())
    with pytest.raises(ValueError, match="only pixel models with the official DDIM UNet"):
        export_diffusers(wrapped, tmp_path / "out")


# ---- folders: pipelines, lone models, missing files ----------------------------------------------------


def test_text_pipeline_folder_loads_offline_with_its_components(text_folder: Path) -> None:
    model = md.load_model(text_folder)
    assert type(model).__name__ == "DiffusersLatentDenoiser" and model.folder == text_folder
    reference = md.load_model(tiny_text_to_image(seed=1))
    x, t = torch.randn(2, *model.sample_shape), torch.full((2,), 300)
    with torch.no_grad(), model.conditioned(["the cat", "a dog"], guidance_scale=3.0), \
            reference.conditioned(["the cat", "a dog"], guidance_scale=3.0):
        assert torch.equal(model(x, t), reference(x, t))


def test_lone_model_folder_takes_the_scheduler_beside_it(tmp_path: Path) -> None:
    tiny_unet2d().save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="no scheduler: .*pass scheduler="):
        md.load_model(tmp_path / "unet")
    ddim_scheduler().save_pretrained(tmp_path / "scheduler")
    assert md.load_model(tmp_path / "unet").schedule.final_alpha_bar < 1.0
    assert md.load_model(tmp_path / "unet", scheduler=ddim_scheduler(set_alpha_to_one=True)).schedule.final_alpha_bar == 1.0


def test_missing_files_fail_with_their_names(text_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(text_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="component 'unet'.*diffusion_pytorch_model.safetensors.*never downloads"):
        md.load_model(broken)
    shutil.copy(text_folder / "unet" / "diffusion_pytorch_model.safetensors", broken / "unet")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FileNotFoundError, match="component 'tokenizer'.*does not exist"):
        md.load_model(broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": ["somewhere", "Net"]}))
    with pytest.raises(ValueError, match="from 'somewhere'; modiff loads components of diffusers and transformers only"):
        md.load_model(broken)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="holds a AutoencoderKL; supported networks"):
        md.load_model(tmp_path / "vae")


# ---- the command line ---------------------------------------------------------------------------------


def test_sample_text_folder_with_prompts(text_folder: Path, tmp_path: Path) -> None:
    base = ["sample", "--model", str(text_folder), "--steps", "2", "--seeds", "0-2", "--device", "cpu", "--guidance", "3"]
    first = _invoke(*base, "--prompt", "the cat", "--prompt", "a dog", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    (tmp_path / "prompts.txt").write_text("the cat\n\na dog\n")
    second = _invoke(*base, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "b"))
    assert second.exit_code == 0, second.output
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert a["identity"]["model"]["prompts"] == ["the cat", "a dog"] == b["identity"]["model"]["prompts"]
    assert a["identity"]["model"]["guidance_scale"] == 3.0
    for seed in range(3):  # seed s takes prompt s mod 2, whichever way the prompts came
        name = f"samples/{seed:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    shape = torch.from_numpy(__import__("numpy").load(tmp_path / "a" / "samples.npz")["images"]).shape
    assert tuple(shape) == (3, 16, 16, 3)


def test_prompt_errors(text_folder: Path, tmp_path: Path) -> None:
    out = ["--device", "cpu", "--steps", "1", "--seeds", "0", "--out", str(tmp_path / "run")]
    missing = _invoke("sample", "--model", str(text_folder), *out)
    assert missing.exit_code == 2 and "text-conditioned: give --prompt TEXT or --prompts FILE" in missing.output
    both = _invoke("sample", "--model", str(text_folder), "--prompt", "x", "--prompts", __file__, *out)
    assert both.exit_code == 2 and "not both" in both.output
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = _invoke("sample", "--model", str(text_folder), "--prompts", str(tmp_path / "empty.txt"), *out)
    assert empty.exit_code == 2 and "holds no prompt" in empty.output
    low = _invoke("sample", "--model", str(text_folder), "--prompt", "x", "--guidance", "0.5", *out)
    assert low.exit_code == 2 and "--guidance" in low.output
    if HAS_FMNIST:
        unconditional = _invoke("sample", "--model", "fmnist-ddim", "--prompt", "x", *out)
        assert unconditional.exit_code == 2 and "apply to text-conditioned models" in unconditional.output
    config = _invoke("sample", "--model", str(text_folder), "--config", __file__, "--prompt", "x", *out)
    assert config.exit_code == 2 and "drop --config" in config.output
    record = _invoke("record", "--model", str(text_folder), *out)
    assert record.exit_code == 2 and "`modiff record` takes no prompts" in record.output


def test_bops_of_a_text_folder(text_folder: Path) -> None:
    result = _invoke("bops", "--model", str(text_folder), "--preset", "w8a4-modiff", "--steps", "10")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stderr: the loading progress bars of transformers
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in md.load_model(text_folder).net.modules())
    assert report["layers_counted"] == layers and report["gmacs_attention_matmuls"] > 0
    assert report["gbops_per_step"] == pytest.approx(report["gmacs_conv_linear"] * 8 * 4)


def test_exported_folder_samples_and_records_from_the_command_line(tmp_path: Path) -> None:
    from modiff.pipelines.train import DDIMTrainConfig, export_weights

    from conftest import TINY

    export_weights(tiny_net(2), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    exported = _invoke("export-diffusers", "--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "pipe"))
    assert exported.exit_code == 0, exported.output
    run = ["--steps", "2", "--seeds", "0-1", "--device", "cpu"]
    for name in ("tiny", "pipe"):
        result = _invoke("sample", "--model", str(tmp_path / name), *run, "--out", str(tmp_path / f"run-{name}"))
        assert result.exit_code == 0, result.output
    images = [__import__("numpy").load(tmp_path / f"run-{name}" / "samples.npz")["images"].astype(int) for name in ("tiny", "pipe")]
    assert abs(images[0] - images[1]).max() <= 1  # equal eps to float rounding: at most one grey level apart
    recorded = _invoke("record", "--model", str(tmp_path / "pipe"), *run, "--sites", "net.mid_block.*",
                       "--out", str(tmp_path / "rec"))
    assert recorded.exit_code == 0, recorded.output
    sites = set(md.load_recording(tmp_path / "rec").stats["site"])
    assert sites and all(site.startswith("net.mid_block.") for site in sites)
