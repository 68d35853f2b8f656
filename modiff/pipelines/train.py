"""Training of the embedded models (eps prediction), resumable from a checkpoint.

The recipe of the CIFAR-10 DDPM/DDIM models scaled to Fashion-MNIST: uniform t, MSE on eps, Adam 2e-4,
gradient clipping at 1, random horizontal flips, bf16 autocast on GPU, and an EMA of the weights with decay
min(0.9999, (1 + step) / (10 + step)): the warm-up keeps a short run's EMA from being dominated by the
random initialisation (with a fixed 0.9999 the first 10k steps keep about a third of the weight).
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from modiff.datasets import fashion_mnist
from modiff.diffusion.schedules import linear_schedule
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.utils.checksums import add_checksums
from modiff.utils.progress import progress_bar
from modiff.utils.runs import atomic_path, environment, write_json

__all__ = ["DDIMTrainConfig", "train_ddim", "export_weights"]

log = logging.getLogger(__name__)

SHARD_BYTES = 16 * 2**20 - 2**16  # each shipped file stays under 16 MiB


@dataclass(frozen=True)
class DDIMTrainConfig:
    model: DDIMUNetConfig = field(default_factory=lambda: DDIMUNetConfig(ch=64, in_channels=1, out_ch=1))
    iterations: int = 30_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_iterations: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    bf16: bool = True
    compile: bool = True
    seed: int = 0
    checkpoint_every: int = 2000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.iterations <= 0 or self.batch_size <= 0:
            raise ValueError("iterations and batch_size must be positive")

    def official_yaml(self) -> dict[str, Any]:
        """The config in the official DDIM YAML layout, so `load_model` reads it like a real one."""
        model = self.model.to_dict()
        image_size = model.pop("image_size")
        return {
            "data": {"dataset": "FASHION-MNIST", "image_size": image_size, "channels": model["in_channels"]},
            "model": {"type": "simple", **model, "var_type": "fixedlarge", "ema_rate": self.ema_decay, "ema": True},
            "diffusion": {
                "beta_schedule": "linear",
                "beta_start": self.beta_start,
                "beta_end": self.beta_end,
                "num_diffusion_timesteps": self.num_timesteps,
            },
        }


def _ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        ema_params = list(ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - d)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_ddim(config: DDIMTrainConfig, out_dir: Path, data_dir: Optional[Path] = None, device: str = "cuda") -> Path:
    """Train (or resume) into `out_dir`; returns the folder of exported EMA weights.

    Initialisation and dropout use torch's global generators, seeded from `config.seed` inside a forked
    RNG state, so the caller's random state is left as it was.
    """
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _train_ddim(config, out_dir, data_dir, dev)


def _train_ddim(config: DDIMTrainConfig, out_dir: Path, data_dir: Optional[Path], dev: torch.device) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    images, _ = fashion_mnist("train", data_dir)
    images = images.to(dev)
    schedule = linear_schedule(config.beta_start, config.beta_end, config.num_timesteps)
    alpha_bar = schedule.alpha_bar.to(dev)

    torch.manual_seed(config.seed)
    model = DDIMUNet(config.model).to(dev).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    step, ckpt_path, log_path = 0, out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{ckpt_path} was made with another config; use a new output directory")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if "torch_rng" in state:  # dropout draws from the global generators, not from `generator`
            torch.set_rng_state(state["torch_rng"])
            if dev.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], dev)
        step = state["step"]
        log.info("resuming from step %d", step)
    forward = torch.compile(model) if config.compile and dev.type == "cuda" else model

    def loss_fn(x0: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, config.num_timesteps, (x0.shape[0],), device=dev, generator=generator)
        noise = torch.randn(x0.shape, device=dev, generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16 and dev.type == "cuda"):
            eps = forward(x_t.contiguous(memory_format=torch.channels_last), t)
        return (eps.float() - noise).square().mean()

    running: list[torch.Tensor] = []
    start = time.time()
    bar = progress_bar(desc="train ddim", total=config.iterations, initial=step, mininterval=5)
    while step < config.iterations:
        idx = torch.randint(0, len(images), (config.batch_size,), device=dev, generator=generator)
        x0 = images[idx]
        flip = torch.rand(config.batch_size, device=dev, generator=generator) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_iterations)
        loss = loss_fn(x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        _ema_update(ema, model, step, config.ema_decay)
        running.append(loss.detach())
        step += 1
        bar.update(1)
        if step % 100 == 0:
            mean_loss = torch.stack(running).mean().item()  # one host sync per 100 steps
            running.clear()
            _append_log(log_path, step, mean_loss, time.time() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if step % config.checkpoint_every == 0 or step == config.iterations:
            _save_checkpoint(ckpt_path, {
                "config": asdict(config), "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            })
    bar.close()
    export = out_dir / "export"
    export_weights(ema, config.official_yaml(), export)
    write_json({"config": asdict(config), "environment": environment(dev), "iterations": step,
                "seconds_this_session": round(time.time() - start, 1)}, export / "manifest.json")
    add_checksums(export, shard_names(export))
    return export


def _append_log(path: Path, step: int, loss: float, seconds: float) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", "loss", "seconds"])
        writer.writerow([step, f"{loss:.6f}", f"{seconds:.1f}"])


def shard_names(folder: Path) -> list[str]:
    """The safetensors shards an exported folder's index names."""
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def export_weights(model: nn.Module, official_yaml: dict[str, Any], folder: str | Path) -> None:
    """fp16 safetensors shards of at most 16 MiB each, an index, the YAML config, and the shards' SHA-256
    in manifest.json (`modiff.utils.checksums`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(folder / name) as tmp:
            save_file(shard, str(tmp))
        weight_map.update({k: name for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1) + "\n")
    with atomic_path(folder / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(official_yaml, sort_keys=False))
    add_checksums(folder, shard_names(folder))  # the manifest never lists stale checksums
