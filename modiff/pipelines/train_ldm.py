"""Training of the embedded latent model `fmnist-ldm`: a KL autoencoder, then a latent UNet (resumable).

Stage (a), first stage: the CompVis AutoencoderKL with f = 4 (32x32x1 -> 8x8x4 latents) on Fashion-MNIST
padded to 32x32 in [-1, 1]. Loss: L1 reconstruction plus kl_weight (1e-6, the CompVis KL-f4 value)
times the posterior KL. CompVis sums both over dimensions; here both are divided by the number of pixels,
the same objective up to a constant that Adam ignores. There is no GAN and no LPIPS term: they sharpen
textures of natural images, while these small grey-level images are reconstructed well by L1 alone.

Stage (b), diffusion: the CompVis UNetModel on the latents z = scale_factor * (posterior sample), with
scale_factor = 1 / std(z) measured on training images (CompVis `scale_by_std`, here over `scale_images`
images instead of one batch, rounded to fp16 so the shipped fp16 buffer is the value used in training).
eps prediction, MSE, the LDM sqrt-linear schedule, Adam with warm-up, gradient clipping and an EMA with
the warm-up decay min(0.9999, (1 + n) / (10 + n)) (CompVis LitEma uses the same). Random horizontal
flips: the latents of both orientations are encoded once.

Output folder (`out_dir`): config.yaml (the CompVis LatentDiffusion layout, so `load_model(out_dir)` and
the `fmnist-ldm` preset read it), fp16 safetensors shards in the CompVis state_dict layout (EMA UNet
weights), train_log.csv (UNet), autoencoder_log.csv, manifest.json (config, environment, durations,
scale factor, test-set reconstruction error); work/ holds the resumable checkpoints and is not shipped.
"""
from __future__ import annotations

import copy
import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from modiff.datasets import fashion_mnist
from modiff.diffusion.schedules import sqrt_linear_schedule
from modiff.models.latent import compvis_module
from modiff.models.ldm import AutoencoderKL, UNetModel
from modiff.utils.runs import atomic_path, environment, write_json
from modiff.pipelines.train import _ema_update, export_weights, shard_names
from modiff.utils.checksums import add_checksums
from modiff.utils.progress import progress_bar

__all__ = ["AutoencoderTrainConfig", "LatentUNetTrainConfig", "LDMTrainConfig", "train_ldm", "reconstruction_error"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """The KL autoencoder (CompVis ddconfig fields) and its optimisation."""

    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 4)  # two downsamplings: f = 4
    num_res_blocks: int = 1
    z_channels: int = 4
    attn_resolutions: tuple[int, ...] = ()
    iterations: int = 5000
    batch_size: int = 256
    lr: float = 4e-4
    kl_weight: float = 1e-6

    def ddconfig(self, resolution: int, channels: int) -> dict[str, Any]:
        return {"double_z": True, "z_channels": self.z_channels, "resolution": resolution, "in_channels": channels,
                "out_ch": channels, "ch": self.ch, "ch_mult": list(self.ch_mult), "num_res_blocks": self.num_res_blocks,
                "attn_resolutions": list(self.attn_resolutions), "dropout": 0.0}


@dataclass(frozen=True)
class LatentUNetTrainConfig:
    """The latent UNet (CompVis unet_config params) and its optimisation."""

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3)  # latent 8x8 -> 4x4 -> 2x2
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (2, 4)  # attention at 4x4 and 2x2
    num_head_channels: int = 32
    dropout: float = 0.0
    iterations: int = 8000
    batch_size: int = 512
    lr: float = 3e-4
    ema_decay: float = 0.9999

    def params(self, latent_size: int, latent_channels: int) -> dict[str, Any]:
        return {"image_size": latent_size, "in_channels": latent_channels, "out_channels": latent_channels,
                "model_channels": self.model_channels, "attention_resolutions": list(self.attention_resolutions),
                "num_res_blocks": self.num_res_blocks, "channel_mult": list(self.channel_mult),
                "num_head_channels": self.num_head_channels, "dropout": self.dropout,
                "use_scale_shift_norm": True, "resblock_updown": True}


@dataclass(frozen=True)
class LDMTrainConfig:
    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    unet: LatentUNetTrainConfig = field(default_factory=LatentUNetTrainConfig)
    image_size: int = 32
    channels: int = 1
    linear_start: float = 0.0015
    linear_end: float = 0.0155  # the LSUN-churches LDM-8 values
    num_timesteps: int = 1000
    warmup_iterations: int = 500
    grad_clip: float = 1.0
    scale_images: int = 10_000
    bf16: bool = True
    compile: bool = True
    seed: int = 0
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        for stage in (self.autoencoder, self.unet):
            if stage.iterations <= 0 or stage.batch_size <= 0:
                raise ValueError(f"iterations and batch_size must be positive, got {stage}")
        if self.image_size % self.downsampling:
            raise ValueError(f"image_size {self.image_size} is not divisible by the autoencoder factor {self.downsampling}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.autoencoder.ch_mult) - 1)

    def compvis_yaml(self) -> dict[str, Any]:
        """The config in the CompVis LatentDiffusion YAML layout (what `load_model` reads)."""
        latent = self.image_size // self.downsampling
        z = self.autoencoder.z_channels
        first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": z, "ddconfig": self.autoencoder.ddconfig(self.image_size, self.channels),
            "lossconfig": {"target": "torch.nn.Identity"}}}
        unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": self.unet.params(latent, z)}
        return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
            "linear_start": self.linear_start, "linear_end": self.linear_end, "timesteps": self.num_timesteps,
            "first_stage_key": "image", "image_size": latent, "channels": z, "scale_by_std": True,
            "parameterization": "eps", "unet_config": unet, "first_stage_config": first_stage,
            "cond_stage_config": "__is_unconditional__"}}}


def train_ldm(config: LDMTrainConfig, out_dir: Path, data_dir: Optional[Path] = None, device: str = "cuda") -> Path:
    """Train (or resume) both stages into `out_dir` and export; returns `out_dir`.

    Initialisation uses torch's global generator, seeded from `config.seed` inside a forked RNG state,
    so the caller's random state is left as it was.
    """
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _train_ldm(config, Path(out_dir), data_dir, dev)


def _train_ldm(config: LDMTrainConfig, out_dir: Path, data_dir: Optional[Path], dev: torch.device) -> Path:
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    images = fashion_mnist("train", data_dir, size=config.image_size)[0].to(dev)
    yaml = config.compvis_yaml()
    started = time.time()
    params = yaml["model"]["params"]
    autoencoder = _run_stage(config, "autoencoder", lambda: AutoencoderKL(
        params["first_stage_config"]["params"]["ddconfig"], config.autoencoder.z_channels),
        _autoencoder_loss(config, images), len(images), out_dir, dev)
    seconds_ae = time.time() - started
    latents = _latents(config, autoencoder, images, work / "latents.pt", dev)
    unet = _run_stage(config, "unet", lambda: UNetModel(**params["unet_config"]["params"]),
                      _unet_loss(config, latents, dev), len(latents["mean"]), out_dir, dev)
    export_weights(compvis_module(unet, autoencoder, latents["scale_factor"]), yaml, out_dir)
    from modiff.models.registry import load_model

    recon = reconstruction_error(load_model(out_dir), fashion_mnist("test", data_dir, size=config.image_size)[0], dev)
    write_json({"config": asdict(config), "environment": environment(dev), "scale_factor": latents["scale_factor"],
                "reconstruction_test": recon, "unet_parameters": sum(p.numel() for p in unet.parameters()),
                "autoencoder_parameters": sum(p.numel() for p in autoencoder.parameters()),
                "seconds_this_session": {"autoencoder": round(seconds_ae, 1), "total": round(time.time() - started, 1)}},
               out_dir / "manifest.json")
    add_checksums(out_dir, shard_names(out_dir))
    return out_dir


# (batch indices, generator) -> (loss, values to log); built around the (possibly compiled) network.
LossFn = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _autoencoder_loss(config: LDMTrainConfig, images: torch.Tensor) -> Callable[[nn.Module], LossFn]:
    pixels = config.channels * config.image_size**2

    def make(forward_model: nn.Module) -> LossFn:
        def loss_fn(idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            x = images[idx]
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            latent = config.image_size // config.downsampling
            noise = torch.randn(x.shape[0], config.autoencoder.z_channels, latent, latent, device=x.device, generator=generator)
            rec, kl = forward_model(x, noise)
            l1 = (rec.float() - x).abs().mean()
            return l1 + config.autoencoder.kl_weight * kl.float().mean() / pixels, {"l1": l1, "kl": kl.float().mean()}
        return loss_fn

    return make


class _AutoencoderStep(nn.Module):
    """x, n -> (decode(mean + std n), KL per sample): the sampled posterior as one compilable graph."""

    def __init__(self, model: AutoencoderKL):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(x)
        return self.model.decode(posterior.mean + posterior.std * noise), posterior.kl()


def _unet_loss(config: LDMTrainConfig, latents: dict[str, Any], dev: torch.device) -> Callable[[nn.Module], LossFn]:
    alpha_bar = sqrt_linear_schedule(config.linear_start, config.linear_end, config.num_timesteps).alpha_bar.to(dev)
    mean, std, scale = latents["mean"], latents["std"], latents["scale_factor"]

    def make(forward_model: nn.Module) -> LossFn:
        def loss_fn(idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=dev, generator=generator)) * scale
            t = torch.randint(0, config.num_timesteps, (idx.shape[0],), device=dev, generator=generator)
            noise = torch.randn(z0.shape, device=dev, generator=generator)
            a = alpha_bar[t].view(-1, 1, 1, 1)
            eps = forward_model((a.sqrt() * z0 + (1 - a).sqrt() * noise).contiguous(memory_format=torch.channels_last), t)
            loss = (eps.float() - noise).square().mean()
            return loss, {"loss": loss}
        return loss_fn

    return make


def _run_stage(config: LDMTrainConfig, stage: str, build: Callable[[], nn.Module],
               make_loss: Callable[[nn.Module], LossFn], num_items: int, out_dir: Path, dev: torch.device) -> nn.Module:
    """One resumable training stage over items 0..num_items-1; returns the EMA copy (unet) or the model
    (autoencoder), in eval mode."""
    settings = getattr(config, stage)
    torch.manual_seed(config.seed if stage == "autoencoder" else config.seed + 1)
    model = build().to(dev).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if stage == "unet" else None
    betas = (0.5, 0.9) if stage == "autoencoder" else (0.9, 0.999)  # CompVis: (0.5, 0.9) for autoencoders
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=betas)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    ckpt = out_dir / "work" / f"{stage}.pt"
    step = _resume(ckpt, config, model, ema, optimizer, generator, dev)
    core = _AutoencoderStep(model) if stage == "autoencoder" else model
    loss_fn = make_loss(torch.compile(core) if config.compile and dev.type == "cuda" else core)
    log_path = out_dir / ("train_log.csv" if stage == "unet" else "autoencoder_log.csv")
    running: list[dict[str, torch.Tensor]] = []
    start = time.time()
    with progress_bar(desc=f"train ldm {stage}", total=settings.iterations, initial=step, mininterval=5) as bar:
        while step < settings.iterations:
            idx = torch.randint(0, num_items, (settings.batch_size,), device=dev, generator=generator)
            for group in optimizer.param_groups:
                group["lr"] = _lr(settings.lr, step, config.warmup_iterations, settings.iterations, cosine=ema is None)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16 and dev.type == "cuda"):
                loss, parts = loss_fn(idx, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:
                _ema_update(ema, model, step, settings.ema_decay)
            running.append({k: v.detach() for k, v in parts.items()})
            step += 1
            bar.update(1)
            if step % 100 == 0 or step == settings.iterations:
                means = {k: torch.stack([r[k] for r in running]).mean().item() for k in running[0]}  # one sync
                running.clear()
                _append_log(log_path, step, means, time.time() - start)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()})
            if step % config.checkpoint_every == 0 or step == settings.iterations:
                _save(ckpt, config, model, ema, optimizer, generator, step, dev)
    return (ema if ema is not None else model).eval()


def _lr(base: float, step: int, warmup: int, total: int, cosine: bool) -> float:
    """Linear warm-up, then constant (UNet: its EMA averages) or a cosine decay to 0 (autoencoder)."""
    scale = min(1.0, (step + 1) / warmup)
    if cosine and step >= warmup:
        scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return base * scale


def _save(path: Path, config: LDMTrainConfig, model: nn.Module, ema: Optional[nn.Module], optimizer: torch.optim.Optimizer,
          generator: torch.Generator, step: int, dev: torch.device) -> None:
    state = {"config": asdict(config), "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
             "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step,
             "torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, config: LDMTrainConfig, model: nn.Module, ema: Optional[nn.Module],
            optimizer: torch.optim.Optimizer, generator: torch.Generator, dev: torch.device) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != asdict(config):
        raise ValueError(f"{path} was made with another config; use a new output directory")
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generators
    if dev.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], dev)
    log.info("resuming %s from step %d", path.stem, state["step"])
    return state["step"]


@torch.no_grad()
def _latents(config: LDMTrainConfig, autoencoder: AutoencoderKL, images: torch.Tensor, path: Path,
             dev: torch.device) -> dict[str, Any]:
    """Posterior mean and std of every training image in both orientations, and the scale factor
    (cached in `path`, so a resumed run trains on exactly the same latents)."""
    if path.exists():
        cached = torch.load(path, map_location=dev, weights_only=True)
        return {**cached, "scale_factor": float(cached["scale_factor"])}
    means, stds = [], []
    for flipped in (False, True):
        for batch in images.split(1024):
            posterior = autoencoder.encode(batch.flip(-1) if flipped else batch)
            means.append(posterior.mean)
            stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    n = min(config.scale_images, len(images))
    z = mean[:n] + std[:n] * torch.randn(mean[:n].shape, device=dev, generator=generator)
    scale = float(torch.tensor(1.0 / z.float().std().item()).half())  # fp16-exact: the shipped buffer is fp16
    log.info("latent std %.4f -> scale_factor %.6f", 1 / scale, scale)
    result = {"mean": mean, "std": std, "scale_factor": torch.tensor(scale)}
    with atomic_path(path) as tmp:
        torch.save(result, tmp)
    return {**result, "scale_factor": scale}


@torch.no_grad()
def reconstruction_error(model: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                         batch_size: int = 500) -> dict[str, float]:
    """Encode (posterior mode) and decode `images` in [-1, 1]: MSE in that range, and PSNR = 10 log10(2^2 / MSE)
    (the same as on [0, 1] images with peak 1), from the MSE over all images."""
    model = model.to(device)
    total = 0.0
    for batch in images.split(batch_size):
        batch = batch.to(device)
        total += float((model.decode(model.encode(batch)) - batch).square().sum())
    mse = total / images.numel()
    return {"mse": mse, "psnr_db": 10 * math.log10(4.0 / mse), "num_images": len(images)}


def _append_log(path: Path, step: int, values: dict[str, float], seconds: float) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["step", *values, "seconds"])
        writer.writerow([step, *(f"{v:.6f}" for v in values.values()), f"{seconds:.1f}"])
