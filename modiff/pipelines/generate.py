"""Sampling into a run directory: one PNG per seed, resumable and shardable by seed.

Layout of a run directory:
    manifest.json      the sample config, seeds, environment and durations of every session
    samples/000007.png one image per seed, written atomically
    grid.png           the first (up to) 100 seeds
    samples.npz        uint8 images (N, H, W, C) and their seeds, in seed order
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Literal, Optional, Sequence, get_args

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from modiff.pipelines.cuda_graphs import CUDAGraphed
from modiff.diffusion.sampling import SAMPLERS, Callback
from modiff.diffusion.schedules import Spacing, timesteps
from modiff.utils.images import make_grid, save_png, to_uint8
from modiff.models.denoisers import to_images
from modiff.utils.device import resolve_device
from modiff.utils.rng import SeedStreams
from modiff.utils.runs import atomic_path, ensure_writable_dir, environment, write_json

__all__ = ["SampleConfig", "Precision", "SamplerName", "generate", "finished_run", "sample", "read_samples",
           "float32_precision", "precision_record"]

log = logging.getLogger(__name__)

SamplerName = Literal["ddim", "ddpm", "dpm-solver"]
Precision = Literal["fp32", "tf32", "bf16"]


@dataclass(frozen=True)
class SampleConfig:
    """What determines the images of a run (the batch size and device do not)."""

    sampler: SamplerName = "ddim"
    steps: int = 100
    spacing: Spacing = "uniform"
    eta: float = 0.0
    precision: Precision = "fp32"  # fp32: IEEE float32 (TF32 off on CUDA); tf32: TF32 matmuls and convolutions; bf16: autocast

    def __post_init__(self) -> None:
        if self.sampler not in get_args(SamplerName):
            raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {', '.join(get_args(SamplerName))}")
        if self.precision not in get_args(Precision):
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {', '.join(get_args(Precision))}")
        if self.sampler != "ddim" and self.eta != 0.0:
            raise ValueError(f"eta applies to the ddim sampler only; got eta={self.eta} with {self.sampler}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _tf32_switches() -> dict[str, tuple[Any, str]]:
    """name -> (object, attribute) of every CUDA TF32 switch: the ``fp32_precision`` settings of torch >= 2.9
    ("ieee" / "tf32" / "none"), else the legacy ``allow_tf32`` flags (torch refuses a mix of the two APIs)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {"cuda.matmul.fp32_precision": (torch.backends.cuda.matmul, "fp32_precision"),
                "cudnn.conv.fp32_precision": (torch.backends.cudnn.conv, "fp32_precision"),
                "cudnn.rnn.fp32_precision": (torch.backends.cudnn.rnn, "fp32_precision")}
    return {"cuda.matmul.allow_tf32": (torch.backends.cuda.matmul, "allow_tf32"),
            "cudnn.allow_tf32": (torch.backends.cudnn, "allow_tf32")}


def _tf32_value(attribute: str, allow: bool) -> Any:
    return allow if attribute == "allow_tf32" else ("tf32" if allow else "ieee")


@contextlib.contextmanager
def float32_precision(precision: Precision) -> Iterator[None]:
    """CUDA float32 matmuls and cuDNN convolutions in TF32 only for ``precision == "tf32"``; IEEE float32
    otherwise (fp32, and the float32 parts of bf16 autocast). The previous settings are restored on exit."""
    if precision not in get_args(Precision):
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(get_args(Precision))}")
    switches = list(_tf32_switches().values())
    before = [getattr(obj, name) for obj, name in switches]
    try:
        for obj, name in switches:
            setattr(obj, name, _tf32_value(name, precision == "tf32"))
        yield
    finally:
        for (obj, name), value in zip(switches, before):
            setattr(obj, name, value)


def precision_record(precision: Precision, device: torch.device) -> dict[str, Any]:
    """What a manifest records about the arithmetic of a run: the precision asked for, the TF32 switches as
    `float32_precision` sets them (read back from torch) and the autocast dtype; ``label`` for tables."""
    with float32_precision(precision):
        switches = {key: getattr(obj, name) for key, (obj, name) in _tf32_switches().items()}
    tf32 = device.type == "cuda" and any(v in (True, "tf32") for v in switches.values())
    label = {"bf16": "bf16 autocast", "tf32": "tf32", "fp32": "fp32"}[precision]
    if device.type == "cuda" and precision != "tf32":
        label += " (TF32 off)"
    return {"precision": precision, "label": label, "device_type": device.type, "tf32": tf32,
            "autocast": "bfloat16" if precision == "bf16" else None, "switches": switches}


def sample(
    model: torch.nn.Module,
    seeds: Sequence[int],
    config: SampleConfig,
    device: torch.device,
    callback: Optional[Callback] = None,
) -> torch.Tensor:
    """One batch of sampler outputs x_0 (B, C, H, W), float32 on `device`, for the given seeds: images
    in [-1, 1] for a pixel model, latents for a latent one (`to_images` decodes them)."""
    ts = timesteps(config.steps, config.spacing, model.schedule.num_timesteps)
    rng = SeedStreams(seeds)
    x_T = rng.randn(model.sample_shape, device=device)
    kwargs: dict[str, Any] = {"callback": callback}
    if config.sampler == "ddim":
        kwargs["eta"] = config.eta
    if config.sampler == "ddpm" or config.eta > 0:
        kwargs["rng"] = rng
    autocast: ContextManager = (
        torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    )
    with float32_precision(config.precision), autocast:
        return SAMPLERS[config.sampler](model, x_T, ts, **kwargs)


def _png(samples_dir: Path, seed: int) -> Path:
    return samples_dir / f"{seed:06d}.png"


def _check_manifest(out_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    path = out_dir / "manifest.json"
    if not path.exists():
        return {"identity": identity, "sessions": []}
    manifest = json.loads(path.read_text())
    if manifest.get("identity") != identity:
        old = manifest.get("identity", {})
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        raise ValueError(
            f"{out_dir} holds a run made with another configuration (differences, old -> new: {diff}). "
            f"Use a new --out directory, or delete the old one."
        )
    return manifest


def _run_identity(model_identity: dict[str, Any], config: SampleConfig) -> dict[str, Any]:
    ident = {"model": model_identity, "sample": asdict(config)}
    return json.loads(json.dumps(ident, default=str))  # as the manifest stores it (tuples -> lists), so resumes match


def finished_run(out_dir: str | Path, seeds: Sequence[int], config: SampleConfig, identity: dict[str, Any]) -> bool:
    """Whether `out_dir` already holds every seed, sampled with this model identity and config (what
    `generate` would reuse), so a caller can skip building the model. A folder made with another
    identity or config is refused (ValueError), as `generate` refuses it."""
    out = Path(out_dir)
    if not (out / "manifest.json").exists():
        return False
    manifest = _check_manifest(out, _run_identity(identity, config))
    done = set(manifest.get("seeds", []))
    return all(s in done and _png(out / "samples", s).exists() for s in seeds)


def generate(
    model: torch.nn.Module,
    seeds: Sequence[int],
    out_dir: str | Path,
    config: SampleConfig = SampleConfig(),
    *,
    batch_size: int = 64,
    device: str = "auto",
    identity: Optional[dict[str, Any]] = None,
    prepare: Optional[Callable[[torch.nn.Module], ContextManager]] = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    progress: bool = True,
) -> Path:
    """Sample every seed whose PNG is not yet on disk into `out_dir`; returns `out_dir`.

    `identity` describes the model (and quantization) for the manifest; a directory made with another
    identity or sample config is refused. `prepare(model)` returns a context entered around each batch
    (the MoDiff trajectory state, for instance). `compile` runs the network through torch.compile
    (modulated layers included: one graph per phase) and `cuda_graphs` replays each step as one CUDA graph
    (`modiff.pipelines.cuda_graphs`, CUDA only); both change speed, not the configuration.
    """
    dev = resolve_device(device)
    if cuda_graphs and dev.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {dev}")
    out = ensure_writable_dir(Path(out_dir))
    samples_dir = ensure_writable_dir(out / "samples")
    manifest = _check_manifest(out, _run_identity(identity or {"name": getattr(model, "name", type(model).__name__)}, config))
    todo = [s for s in seeds if not _png(samples_dir, s).exists()]
    log.info("%d of %d seeds to sample into %s", len(todo), len(seeds), out)
    model = model.to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.net = torch.compile(model.net, dynamic=False)
    if cuda_graphs:
        model.net = CUDAGraphed(model.net)
    started = time.time()
    with tqdm(total=len(todo), desc="sampling", unit="img", disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            with prepare(model) if prepare else nullcontext():
                images = to_uint8(to_images(model, sample(model, batch, config, dev)))
            for seed, image in zip(batch, images):
                save_png(image, _png(samples_dir, seed))
            bar.update(len(batch))
    seconds = time.time() - started
    manifest["sessions"].append({"environment": environment(dev), "precision": precision_record(config.precision, dev),
                                 "seeds_sampled": len(todo), "batch_size": batch_size, "seconds": round(seconds, 2)})
    manifest["seeds"] = sorted(set(manifest.get("seeds", [])) | set(int(s) for s in seeds))
    _write_outputs(out, samples_dir, manifest["seeds"])
    write_json(manifest, out / "manifest.json")
    return out


def read_samples(samples_dir: Path, seeds: Sequence[int]) -> np.ndarray:
    """(N, H, W, C) uint8 images of the given seeds from a samples/ folder."""
    arrays = []
    for seed in seeds:
        array = np.asarray(Image.open(_png(samples_dir, seed)))
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(arrays)


def _write_outputs(out: Path, samples_dir: Path, seeds: Sequence[int]) -> None:
    images = read_samples(samples_dir, seeds)
    save_png(make_grid(images[:100], nrow=10), out / "grid.png")
    with atomic_path(out / "samples.npz") as tmp:
        with tmp.open("wb") as f:
            np.savez(f, images=images, seeds=np.asarray(seeds, dtype=np.int64))
