"""Sampling into a run directory: one PNG per seed, resumable and shardable by seed.

Layout of a run directory:
    manifest.json      the run's identity (written first), seeds, and every session that wrote here
    .lock              held by the one job writing (its rank 0 under torch.distributed; `modiff.utils.locks`)
    samples/000007.png one image per seed, written atomically
    grid.png           the first (up to) 100 seeds
    samples.npz        uint8 images (N, H, W, C) and their seeds, in seed order
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal, Mapping, Optional, Sequence, get_args

import numpy as np
import torch
from PIL import Image

from modiff.utils.distributed import World, portable_error
from modiff.diffusion.sampling import SAMPLERS, Callback, StepInfo
from modiff.diffusion.schedules import Spacing, timesteps
from modiff.utils.images import PngWriter, make_grid, save_png, to_uint8
from modiff.models.denoisers import to_images
from modiff.utils.device import resolve_device
from modiff.pipelines.execution import (Precision, PrecisionChoice, float32_precision, precision_context,
                                        precision_record, prepared_network, resolve_execution, resolve_precision)
from modiff.quant.layers.real import backend_record
from modiff.pipelines.run_folder import (check_identity, execution_identity, is_summary, open_manifest, png_path,
                                         remove_unreadable, run_identity, sampler_identity, seeds_on_disk)
from modiff.utils.locks import folder_lock
from modiff.utils.progress import progress_bar
from modiff.utils.rng import FirstDraw, first_draws_ahead, format_seeds, to_device
from modiff.utils.runs import atomic_path, ensure_writable_dir, environment, write_json

__all__ = ["SampleConfig", "Precision", "SamplerName", "generate", "finished_run", "sample", "read_samples",
           "NonFiniteSamplesError", "float32_precision", "precision_record"]

log = logging.getLogger(__name__)

SamplerName = Literal["ddim", "ddpm", "dpm-solver"]
Condition = Callable[[torch.nn.Module, Sequence[int]], ContextManager]  # (model, the batch's seeds) -> context


@dataclass(frozen=True)
class SampleConfig:
    """How a run samples. With the model, the batch size, the device kind and torch.compile it makes the
    run's identity (`modiff.pipelines.run_folder`): quantized images depend on all of them. ``precision``
    "auto" is the device's (`modiff.pipelines.execution`: bf16 on CUDA, fp32 on the CPU); a run resolves it
    (`resolved`) before it records its identity."""

    sampler: SamplerName = "ddim"
    steps: int = 100
    spacing: Spacing = "uniform"
    eta: float = 0.0
    precision: PrecisionChoice = "auto"  # fp32: IEEE float32 (TF32 off on CUDA); tf32: TF32 matmuls and convolutions; bf16: autocast

    def __post_init__(self) -> None:
        if self.sampler not in get_args(SamplerName):
            raise ValueError(f"unknown sampler {self.sampler!r}; allowed: {', '.join(get_args(SamplerName))}")
        if self.precision not in get_args(PrecisionChoice):
            raise ValueError(f"unknown precision {self.precision!r}; allowed: {', '.join(get_args(PrecisionChoice))}")
        if self.sampler != "ddim" and self.eta != 0.0:
            raise ValueError(f"eta applies to the ddim sampler only; got eta={self.eta} with {self.sampler}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def resolved(self, device: torch.device) -> "SampleConfig":
        """This config with "auto" precision replaced by the device's."""
        return replace(self, precision=resolve_precision(self.precision, device))


def sample(
    model: torch.nn.Module,
    seeds: Sequence[int],
    config: SampleConfig,
    device: torch.device,
    callback: Optional[Callback] = None,
    first_draw: Optional[FirstDraw] = None,
) -> torch.Tensor:
    """One batch of sampler outputs x_0 (B, C, H, W), float32 on `device`, for the given seeds: images
    in [-1, 1] for a pixel model, latents for a latent one (`to_images` decodes them). ``first_draw``: the
    seeds' initial noise drawn beforehand (`first_draws_ahead`), else it is drawn here."""
    ts = timesteps(config.steps, config.spacing, model.schedule.num_timesteps)
    first_draw = first_draw or FirstDraw.of(seeds, model.sample_shape)
    if first_draw.streams.seeds != [int(s) for s in seeds]:
        raise ValueError(f"first_draw holds seeds {format_seeds(first_draw.streams.seeds)}, not {format_seeds(seeds)}")
    rng, x_T = first_draw.streams, to_device(first_draw.x_T, device)
    kwargs: dict[str, Any] = {"callback": callback}
    if config.sampler == "ddim":
        kwargs["eta"] = config.eta
    if config.sampler == "ddpm" or config.eta > 0:
        kwargs["rng"] = rng
    if config.sampler == "ddpm":
        kwargs["clip_denoised"] = getattr(model, "clip_denoised", True)
    with precision_context(resolve_precision(config.precision, device), device):
        return SAMPLERS[config.sampler](model, x_T, ts, **kwargs)


class NonFiniteSamplesError(ValueError):
    """Some samples came out NaN or infinite; their PNGs are not written."""


class _FiniteWatch:
    """A sampler callback that flags, per sample and step, a non-finite step output x_prev. The flags stay
    on the device (no synchronisation per step) and are read once, if a sample comes out non-finite."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.flags: list[torch.Tensor] = []

    def __call__(self, info: StepInfo) -> None:
        self.steps.append((info.index, info.t))
        self.flags.append(~torch.isfinite(info.x_prev).flatten(1).all(1))

    def first_step(self, row: int) -> Optional[tuple[int, int]]:
        """(step index, t) of the first non-finite output of sample ``row``; None if every step was finite."""
        if not self.flags:
            return None
        hits = torch.stack(self.flags)[:, row].nonzero()
        return self.steps[int(hits[0])] if len(hits) else None


def _non_finite_message(bad: dict[int, Optional[tuple[int, int]]], steps: int) -> str:
    where: dict[str, list[int]] = {}
    for seed, step in bad.items():
        at = "after the last step, in decoding the latents" if step is None else \
            f"first at sampling step {step[0] + 1} of {steps} (t={step[1]})"
        where.setdefault(at, []).append(seed)
    parts = "; ".join(f"seeds {format_seeds(seeds)}: {at}" for at, seeds in where.items())
    return (f"{len(bad)} samples came out NaN or infinite ({parts}); their PNGs were not written. Usual causes: a "
            f"NaN in the checkpoint's weights, or an overflow (bf16, too few bits).")


def _write_batch(batch: Sequence[int], x: torch.Tensor, watch: _FiniteWatch, samples_dir: Path, writer: PngWriter,
                 written: dict[int, np.ndarray], present: set[int]) -> None:
    """Queue the PNGs of a batch's finite samples that are not ``present`` (on disk before the run; kept in
    ``written`` by seed); raise for the others."""
    finite = torch.isfinite(x).flatten(1).all(1)
    images, finite = to_uint8(x), finite.tolist()  # the batch's only waits on the device
    new = {seed: image for seed, image, ok in zip(batch, images, finite) if ok and seed not in present}
    writer.submit(list(new.values()), [png_path(samples_dir, seed) for seed in new])
    written.update(new)
    bad = {seed: watch.first_step(row) for row, (seed, ok) in enumerate(zip(batch, finite)) if not ok}
    if bad:
        raise NonFiniteSamplesError(_non_finite_message(bad, len(watch.steps)))


def finished_run(out_dir: str | Path, seeds: Sequence[int], config: SampleConfig, identity: dict[str, Any],
                 device: str = "auto") -> bool:
    """Whether `out_dir` already holds every seed, sampled with this model identity and config (what
    `generate` on `device` would reuse: "auto" precision is the device's), so a caller can skip building the
    model. A folder made with another identity or config is refused (ValueError), as `generate` refuses it;
    so is a summary of a run (`modiff.pipelines.summary`) that lacks some of the seeds."""
    out = Path(out_dir)
    if not (out / "manifest.json").exists():
        return False
    config = config.resolved(resolve_device(device))
    manifest = open_manifest(out, out / "samples", run_identity(identity, asdict(config)))
    done = set(manifest.get("seeds", []))
    if is_summary(manifest):  # a summary stands for its finished run; it cannot take new seeds
        missing = [s for s in seeds if s not in done]
        if missing:
            raise ValueError(f"{out} is a summary (`modiff summarize`) of a run of seeds {format_seeds(sorted(done))}, "
                             f"which lacks {len(missing)} of the seeds asked for (e.g. {format_seeds(missing[:5])}): "
                             f"summarize a run of those seeds, or remove the summary to sample here")
        return True
    present = seeds_on_disk(out / "samples", seeds)
    return all(s in done and s in present for s in seeds)


def _batches(seeds: Sequence[int], batch_size: int, samples_dir: Path) -> list[list[int]]:
    """The batches of the requested seeds, in order, that miss a PNG. A batch is always sampled whole (its
    present PNGs are kept), so a seed's batch companions, on which quantized images depend, are those of
    an uninterrupted run."""
    chunks = [list(seeds[i : i + batch_size]) for i in range(0, len(seeds), batch_size)]
    present = seeds_on_disk(samples_dir, seeds)
    return [c for c in chunks if any(s not in present for s in c)]


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
    compile: Optional[bool] = None,
    cuda_graphs: Optional[bool] = None,
    progress: bool = True,
    condition: Optional[Condition] = None,
) -> Path:
    """Sample every seed whose PNG is not yet on disk into `out_dir`; returns `out_dir`.

    `identity` describes the model (and quantization); with the sample config, the batch size, the
    device kind and `compile` it is the run's identity, written to the manifest before the first image
    and checked on every resume (`modiff.pipelines.run_folder`). One job writes at a time (a lock on
    the folder); a PNG that does not decode is made again. Under torch.distributed the batches are dealt
    over the ranks and each image equals the one-process image (`modiff.pipelines.distributed`).
    `prepare(model)` returns a context entered around each batch (the MoDiff trajectory state, for
    instance); `condition(model, seeds)` one entered inside it, given the batch's seeds (the prompts of a
    text-conditioned model; describe them in `identity`). `compile` runs the network through torch.compile
    and `cuda_graphs` replays each step as one CUDA graph (CUDA only); with "auto" precision, None means
    the device's default (`modiff.pipelines.execution`: the fast path on CUDA). A compiled network sees
    every batch at `batch_size` rows (`PaddedBatch`: a rank's last batch is filled up with repeats of its
    own rows), so one graph serves the run. Each rank writes its PNGs on a background thread while its
    next batch samples. Samples that come out NaN or infinite raise `NonFiniteSamplesError` naming their
    seeds and the first step where it happened.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    _check_scale_runs(model, batch_size, len(seeds))
    timesteps(config.steps, config.spacing, model.schedule.num_timesteps)  # refused before the folder exists
    dev = resolve_device(device)
    run_execution = resolve_execution(dev, config.precision, compile, cuda_graphs,
                                      keyword_net=getattr(model, "net_takes_keywords", False))
    config = replace(config, precision=run_execution.precision)
    out = ensure_writable_dir(Path(out_dir))
    execution = execution_identity(batch_size, dev, run_execution.compile)
    model_ident = {**(identity or {"name": getattr(model, "name", type(model).__name__)}),
                   **sampler_identity(model, config.sampler)}
    ident = run_identity(model_ident, asdict(config), execution)
    world = World.current()  # several ranks under torch.distributed (`modiff.pipelines.distributed`)
    ranks = world.gather({"host": platform.node(), "pid": os.getpid(), "device": str(dev), "execution": execution})
    asked = {"seeds": format_seeds(seeds) if len(seeds) else "", "batch_size": batch_size, "execution": execution,
             "cuda_graphs": run_execution.cuda_graphs, "environment": environment(dev),
             "precision": precision_record(config.precision, dev), "quant_backend": backend_record(model, dev)}
    with contextlib.ExitStack() as held:  # the leader's folder lock, until the run is recorded
        manifest, session, batches = world.from_leader(lambda: _open_run(held, out, seeds, ident, asked, ranks))
        mine = batches[world.rank :: world.size]  # batch k to rank k mod N: the batches of a one-process run
        started, written, error = time.time(), {}, None
        try:
            if mine:
                with prepared_network(model, dev, run_execution, batch_size) as runner:
                    _sample_batches(runner, mine, config, dev, out / "samples", prepare, written,
                                    progress and world.leader, condition)
        except Exception as err:  # every rank learns of it before the leader decides what to record
            error = err
        outcomes = world.gather((len(written), round(time.time() - started, 2), error and portable_error(error)))
        world.from_leader(lambda: _close_run(out, manifest, session, seeds, outcomes, written))
        failed = next((e for _, _, e in outcomes if e is not None), None)
        if failed is not None:
            raise error if error is not None else failed
    return out


def _check_scale_runs(model: torch.nn.Module, batch_size: int, num_seeds: int) -> None:
    """A quantizer whose scale spans g consecutive samples (the published numerics) gives each seed the
    companions it has in a run sampled g at a time only if every batch but the last holds whole runs of g."""
    config = getattr(model, "quant_config", None)
    per_scale = config.samples_per_scale if config is not None else 0
    if per_scale and batch_size % per_scale and num_seeds > batch_size:
        raise ValueError(f"this quantization shares each activation scale over {per_scale} consecutive samples (as "
                         f"the published code's batch of {per_scale}); a batch size of {batch_size} would split those "
                         f"runs across batches: use a multiple of {per_scale}")


def _open_run(held: contextlib.ExitStack, out: Path, seeds: Sequence[int], ident: dict[str, Any],
              asked: dict[str, Any], ranks: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], list[list[int]]]:
    """On the leader: take the folder's lock (held until ``held`` closes), check the identity, record this
    session (every rank of it) in the manifest before any image; returns the manifest, the session and the
    batches to sample."""
    me = held.enter_context(folder_lock(out))
    samples_dir = ensure_writable_dir(out / "samples")
    manifest = open_manifest(out, samples_dir, ident)
    remove_unreadable(samples_dir, seeds)
    batches = _batches(seeds, asked["batch_size"], samples_dir)
    check_identity(out, manifest, ident, adding=bool(batches))
    other = [r for r in ranks if r["execution"] != asked["execution"]]
    if other:
        raise ValueError(f"the ranks of this job differ in execution settings ({asked['execution']} on rank 0, "
                         f"{other[0]['execution']} on {other[0]['host']}), so their images would not match one run: "
                         f"give every rank the same kind of device")
    session = {**me, **asked, "seeds_sampled": 0}
    if len(ranks) > 1:
        session.update(world_size=len(ranks), ranks=[{"rank": i, **{k: r[k] for k in ("host", "pid", "device")}}
                                                      for i, r in enumerate(ranks)])
    manifest["sessions"].append(session)
    write_json(manifest, out / "manifest.json")  # the identity and every writer, before any image
    log.info("%d batches to sample into %s", len(batches), out)
    return manifest, session, batches


def _close_run(out: Path, manifest: dict[str, Any], session: dict[str, Any], seeds: Sequence[int],
               outcomes: list[tuple[int, float, Optional[Exception]]], written: Mapping[int, np.ndarray]) -> None:
    """On the leader, once every rank has finished: record the session and, if no rank failed, the seeds
    as done, grid.png and samples.npz (the leader's new images from memory, ``written``; the other ranks'
    from their PNGs). After a failure the folder keeps what was written (a re-run resumes)."""
    session["seeds_sampled"] = sum(n for n, _, _ in outcomes)
    session["seconds"] = max(seconds for _, seconds, _ in outcomes)
    for rank, (n, seconds, _) in zip(session.get("ranks", []), outcomes):
        rank.update(seeds_sampled=n, seconds=seconds)
    if any(e is not None for _, _, e in outcomes):
        return
    manifest["seeds"] = sorted(set(manifest.get("seeds", [])) | set(int(s) for s in seeds))
    _write_outputs(out, out / "samples", manifest["seeds"], written)
    write_json(manifest, out / "manifest.json")


def _sample_batches(model: torch.nn.Module, batches: list[list[int]], config: SampleConfig, dev: torch.device,
                    samples_dir: Path, prepare: Optional[Callable[[torch.nn.Module], ContextManager]],
                    written: dict[int, np.ndarray], progress: bool, condition: Optional[Condition] = None) -> None:
    """Sample the batches; their new PNGs are written on background threads (every file is on disk when
    this returns) and kept in ``written`` by seed, and each batch's initial noise is drawn on another while
    the batch before it samples. A batch's PNGs already on disk (from an interrupted run) are kept."""
    present = seeds_on_disk(samples_dir, [seed for batch in batches for seed in batch])
    with progress_bar(desc="sampling", enabled=progress, total=sum(map(len, batches)), unit="img") as bar, \
            PngWriter() as writer, first_draws_ahead(batches, model.sample_shape) as first_draws:
        for batch, first_draw in zip(batches, first_draws):
            watch = _FiniteWatch()
            with prepare(model) if prepare else nullcontext(), condition(model, batch) if condition else nullcontext():
                x = to_images(model, sample(model, batch, config, dev, callback=watch, first_draw=first_draw))
            _write_batch(batch, x, watch, samples_dir, writer, written, present)
            bar.update(len(batch))


def read_samples(samples_dir: Path, seeds: Sequence[int],
                 known: Optional[Mapping[int, np.ndarray]] = None) -> np.ndarray:
    """(N, H, W, C) uint8 images of the given seeds from a samples/ folder; those in ``known`` (by seed, as
    just written there) are taken from memory."""
    arrays = []
    for seed in seeds:
        if known is not None and seed in known:
            arrays.append(known[seed])
            continue
        array = np.asarray(Image.open(png_path(samples_dir, seed)))
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return np.stack(arrays)


def _write_outputs(out: Path, samples_dir: Path, seeds: Sequence[int], written: Mapping[int, np.ndarray]) -> None:
    images = read_samples(samples_dir, seeds, written)
    save_png(make_grid(images[:100], nrow=10), out / "grid.png")
    with atomic_path(out / "samples.npz") as tmp:
        with tmp.open("wb") as f:
            np.savez(f, images=images, seeds=np.asarray(seeds, dtype=np.int64))
