"""Training of the embedded DDIM model: export format, exact resumption and config identity."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import modiff
import modiff.pipelines.train as train
from modiff.models.ddim_unet import DDIMUNet
from modiff.pipelines.train import DDIMTrainConfig, export_weights, train_ddim

from conftest import TINY, tiny_net

# dropout stays at its default (0.1): resumption must reproduce the dropout masks too
CONFIG = DDIMTrainConfig(model=TINY, iterations=6, batch_size=4, checkpoint_every=3, compile=False, bf16=False, warmup_iterations=2)
MiB = 2**20


@pytest.fixture(autouse=True)
def synthetic_data(monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Replace Fashion-MNIST by 32 fixed random 16x16 images in [-1, 1]."""
    images = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(train, "fashion_mnist", lambda split, data_dir=None: (images.clone(), torch.zeros(32, dtype=torch.long)))
    return images


def _checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_train_exports_loadable_weights(tmp_path: Path) -> None:
    """The export folder loads with load_model, holds the fp16 EMA weights, shards <= 16 MiB, and a manifest."""
    export = train_ddim(CONFIG, tmp_path / "run", device="cpu")
    model = modiff.load_model(export)
    assert isinstance(model, modiff.Denoiser) and model.sample_shape == (1, 16, 16)
    ckpt = _checkpoint(tmp_path / "run")
    assert ckpt["step"] == 6
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key].half().float()), key
    assert not all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["ema"]), "EMA should lag the model"
    shards = sorted(export.glob("*.safetensors"))
    assert shards and all(p.stat().st_size <= 16 * MiB for p in shards)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["iterations"] == 6 and manifest["config"]["batch_size"] == 4


def test_interrupted_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the step-3 checkpoint and rerun, training ends with bitwise the same weights as one run."""
    train_ddim(CONFIG, tmp_path / "straight", device="cpu")
    real_update = train._ema_update

    def dies_in_step_4(ema, model, step, decay):
        if step == 3:  # 0-based: the 4th iteration, after the checkpoint written at step 3
            raise KeyboardInterrupt
        real_update(ema, model, step, decay)

    monkeypatch.setattr(train, "_ema_update", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_ddim(CONFIG, tmp_path / "resumed", device="cpu")
    assert _checkpoint(tmp_path / "resumed")["step"] == 3
    monkeypatch.setattr(train, "_ema_update", real_update)
    train_ddim(CONFIG, tmp_path / "resumed", device="cpu")
    straight, resumed = _checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "resumed")
    assert resumed["step"] == 6
    for part in ("ema", "model"):
        for key in straight[part]:
            assert torch.equal(straight[part][key], resumed[part][key]), f"{part}.{key}"


def test_training_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """train_ddim seeds inside a forked RNG state: the caller's generator continues unchanged."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_ddim(replace(CONFIG, iterations=2), tmp_path / "run", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_from_other_config_is_refused(tmp_path: Path) -> None:
    """Training into a folder whose checkpoint has another config raises ValueError."""
    train_ddim(replace(CONFIG, iterations=3), tmp_path / "run", device="cpu")
    with pytest.raises(ValueError, match="another config"):
        train_ddim(replace(CONFIG, iterations=3, lr=1e-3), tmp_path / "run", device="cpu")


def test_official_yaml_round_trip() -> None:
    """official_yaml() rebuilds the same UNet config through the official-YAML reader."""
    from modiff.models.ddim_unet import unet_config_from_yaml

    assert unet_config_from_yaml(CONFIG.official_yaml()) == TINY
    assert unet_config_from_yaml(DDIMTrainConfig().official_yaml()) == DDIMTrainConfig().model


def test_export_shards_of_the_shipped_model_size(tmp_path: Path) -> None:
    """The default fmnist-ddim UNet (ch 64) exports to fp16 shards each <= 16 MiB that load back exactly."""
    net = DDIMUNet(DDIMTrainConfig().model)
    export_weights(net, DDIMTrainConfig().official_yaml(), tmp_path / "export")
    shards = sorted((tmp_path / "export").glob("*.safetensors"))
    total = sum(p.numel() for p in net.parameters()) * 2
    assert len(shards) >= total // (16 * MiB) + 1
    assert all(p.stat().st_size <= 16 * MiB for p in shards)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(net.state_dict())
    loaded = modiff.load_model(tmp_path / "export")
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value.half().float()), key


def test_export_many_small_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny shard limit the weights spread over many files and still load back."""
    monkeypatch.setattr(train, "SHARD_BYTES", 20_000)
    net = tiny_net(3)
    export_weights(net, CONFIG.official_yaml(), tmp_path / "export")
    assert len(list((tmp_path / "export").glob("model-*-of-*.safetensors"))) > 5
    loaded = modiff.load_model(tmp_path / "export")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), net.half().float()(x, t))


def test_ema_update_with_warmup() -> None:
    """ema <- d ema + (1 - d) model with d = min(decay, (1 + step) / (10 + step))."""
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    for step, decay in ((0, 0.9999), (5, 0.9999), (10_000, 0.9999), (10_000, 0.5)):
        old = [p.detach().clone() for p in ema.parameters()]
        train._ema_update(ema, model, step, decay)
        d = min(decay, (1 + step) / (10 + step))
        for e, o, m in zip(ema.parameters(), old, model.parameters()):
            torch.testing.assert_close(e.detach(), d * o + (1 - d) * m.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(before[0], next(ema.parameters()))
