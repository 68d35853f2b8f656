"""Training of the embedded latent model: export in the CompVis layout, exact resumption in both stages."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modiff
import modiff.pipelines.train_ldm as train_ldm
from modiff.models.denoisers import LatentDenoiser
from modiff.pipelines.train_ldm import train_ldm as run_training

from test_latent import TINY_LDM

MiB = 2**20


@pytest.fixture(autouse=True)
def synthetic_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace Fashion-MNIST by 32 fixed random 16x16 images in [-1, 1] (train and test)."""
    images = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(train_ldm, "fashion_mnist",
                        lambda split, data_dir=None, size=32: (images.clone(), torch.zeros(32, dtype=torch.long)))


def _checkpoints(folder: Path) -> dict[str, dict]:
    return {stage: torch.load(folder / "work" / f"{stage}.pt", map_location="cpu", weights_only=False)
            for stage in ("autoencoder", "unet")}


def test_train_exports_a_compvis_folder(tmp_path: Path) -> None:
    """The folder loads with load_model as a LatentDenoiser holding the fp16 EMA UNet and the autoencoder;
    shards <= 16 MiB in the CompVis key layout; logs of both stages; a manifest with the test reconstruction."""
    out = run_training(TINY_LDM, tmp_path / "ldm", device="cpu")
    model = modiff.load_model(out)
    assert isinstance(model, LatentDenoiser) and model.sample_shape == (4, 4, 4)
    ckpt = _checkpoints(out)
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, ckpt["unet"]["ema"][key].half().float()), key
    for key, value in model.first_stage.state_dict().items():
        assert torch.equal(value, ckpt["autoencoder"]["model"][key].half().float()), key
    shards = sorted(out.glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= 16 * MiB for p in shards)
    keys = {k for p in shards for k in load_file(p)}
    assert "scale_factor" in keys and all(k.startswith(("model.diffusion_model.", "first_stage_model.", "scale_factor")) for k in keys)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scale_factor"] == model.scale_factor
    assert manifest["reconstruction_test"]["num_images"] == 32 and manifest["reconstruction_test"]["mse"] > 0
    assert (out / "train_log.csv").read_text().startswith("step,loss,seconds")
    assert (out / "autoencoder_log.csv").read_text().startswith("step,l1,kl,seconds")


def test_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in each stage after a checkpoint and rerun, training ends with bitwise the same weights."""
    run_training(TINY_LDM, tmp_path / "straight", device="cpu")
    real_lr, real_ema = train_ldm._lr, train_ldm._ema_update

    def dies_in_autoencoder_step_3(base, step, warmup, total, cosine):
        if cosine and step == 2:  # after the checkpoint written at step 2 (checkpoint_every = 2)
            raise KeyboardInterrupt
        return real_lr(base, step, warmup, total, cosine)

    def dies_in_unet_step_3(ema, model, step, decay):
        if step == 2:
            raise KeyboardInterrupt
        real_ema(ema, model, step, decay)

    for patch, name in ((dies_in_autoencoder_step_3, "_lr"), (dies_in_unet_step_3, "_ema_update")):
        monkeypatch.setattr(train_ldm, name, patch)
        with pytest.raises(KeyboardInterrupt):
            run_training(TINY_LDM, tmp_path / "resumed", device="cpu")
        monkeypatch.setattr(train_ldm, name, real_lr if name == "_lr" else real_ema)
    assert _checkpoints(tmp_path / "resumed")["unet"]["step"] == 2
    run_training(TINY_LDM, tmp_path / "resumed", device="cpu")
    straight, resumed = _checkpoints(tmp_path / "straight"), _checkpoints(tmp_path / "resumed")
    for stage, parts in (("autoencoder", ("model",)), ("unet", ("model", "ema"))):
        assert resumed[stage]["step"] == 4
        for part in parts:
            for key, value in straight[stage][part].items():
                assert torch.equal(value, resumed[stage][part][key]), f"{stage}.{part}.{key}"


def test_training_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """train_ldm seeds inside a forked RNG state; a changed config is refused on resume."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_training(TINY_LDM, tmp_path / "run", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="another config"):
        run_training(replace(TINY_LDM, seed=1), tmp_path / "run", device="cpu")
