"""What a run folder guarantees: one configuration, written first, checked on every resume.

A run's identity is what determines its images:

- ``model``: the model and its quantization (given by the caller);
- ``sample``: the `SampleConfig` (sampler, steps, spacing, eta, precision);
- ``execution``: the batch size, the device kind and torch.compile. Quantized images depend on them
  (a per-tensor scale is taken over the whole batch, and float summation order flips rounding ties: up
  to 89 grey levels between batch 1 and 4 for w8a8), so a run is only ever continued with the same ones.

The manifest holding the identity is written (atomically) before the first image. Adding images to a
folder needs the whole identity to match; reading a finished run needs only ``model`` and ``sample``
(a run made on a GPU is reused on any machine). Every process that writes to the folder appends itself
to ``sessions`` (host, pid, start time, what it was asked for) before it writes an image.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from PIL import Image

__all__ = ["run_identity", "execution_identity", "sampler_identity", "open_manifest", "check_identity", "png_path", "seeds_on_disk", "remove_unreadable",
           "readable_png", "identity_differences", "is_summary"]

log = logging.getLogger(__name__)

READ_ONLY_PARTS = ("model", "sample")


def execution_identity(batch_size: int, device: torch.device, compile: bool) -> dict[str, Any]:
    """The part of a run's identity that does not show in its config but changes quantized images."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"batch_size": int(batch_size), "device": kind, "compile": bool(compile)}


def sampler_identity(model: Any, sampler: str) -> dict[str, Any]:
    """Fields of the model's identity that a sampler's treatment of it adds: an unclipped DDPM x0 (latent
    models, `Denoiser.clip_denoised`). DDPM runs of such a model made before commit 68f5759 were clipped and
    lack the field, so `check_identity` refuses to continue or reuse them; other runs' identities are unchanged."""
    if sampler == "ddpm" and not getattr(model, "clip_denoised", True):
        return {"ddpm_clip_denoised": False}
    return {}


def run_identity(model: Mapping[str, Any], sample: Mapping[str, Any],
                 execution: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    ident: dict[str, Any] = {"model": dict(model), "sample": dict(sample)}
    if execution is not None:
        ident["execution"] = dict(execution)
    return json.loads(json.dumps(ident, default=str))  # as the manifest stores it (tuples -> lists)


def png_path(samples_dir: Path, seed: int) -> Path:
    return samples_dir / _png_name(seed)


def _png_name(seed: int) -> str:
    return f"{seed:06d}.png"


def seeds_on_disk(samples_dir: Path, seeds: Iterable[int]) -> set[int]:
    """The seeds whose PNG ``samples_dir`` holds, from one listing of the folder rather than one file-system
    call per seed (a paper-scale run has 10,000 seeds or more, and on a network file system every call is a
    round trip). An absent folder holds none."""
    try:
        names = set(os.listdir(samples_dir))
    except FileNotFoundError:
        return set()
    return {seed for seed in seeds if _png_name(seed) in names}


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any], parts: Sequence[str]) -> list[str]:
    """``part.field: old -> new`` for every field that differs in ``parts``."""
    found = []
    for part in parts:
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += [f"{part}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        else:
            found.append(f"{part}: {a!r} -> {b!r}")
    return found


def is_summary(manifest: Mapping[str, Any]) -> bool:
    """Whether a manifest is that of a run's summary (`modiff.pipelines.summary`), not of a run."""
    return "summary" in manifest


def check_identity(out_dir: Path, manifest: Mapping[str, Any], identity: Mapping[str, Any], adding: bool) -> None:
    """Refuse a run folder made with another identity (ValueError naming the fields, old -> new). When
    no image is to be added (``adding`` False), only the model and the sample config must match."""
    old = manifest.get("identity", {})
    diff = identity_differences(old, identity, READ_ONLY_PARTS)
    if diff:
        raise ValueError(f"{out_dir} holds a run made with another configuration (old -> new: {'; '.join(diff)}). "
                         f"Use a new --out folder, or delete the old one.")
    if not adding:
        return
    if is_summary(manifest):
        raise ValueError(f"{out_dir} is a summary of a run (`modiff summarize`): it holds statistics, not images, "
                         f"and takes no new ones; sample into the full run, or into a new --out folder")
    if "execution" not in old:
        raise ValueError(f"{out_dir} was made before run folders recorded their batch size and device, so new images "
                         f"could not be guaranteed to match the old ones; sample into a new --out folder")
    diff = identity_differences(old, identity, ("execution",))
    if diff:
        raise ValueError(
            f"{out_dir} was sampled with other execution settings (old -> new: {'; '.join(diff)}). Quantized images "
            f"depend on the batch size, the device and torch.compile, so a run is only continued with the same "
            f"ones: finish it with {_as_options(old['execution'])}, or use a new --out folder.")


def _as_options(execution: Mapping[str, Any]) -> str:
    parts = [f"--batch-size {execution.get('batch_size')}", f"device {execution.get('device')}"]
    return ", ".join(parts) + (", --compile" if execution.get("compile") else ", --no-compile")


def readable_png(path: Path) -> Optional[str]:
    """None if ``path`` decodes as an image, else why not."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        return str(err) or type(err).__name__
    return None


def remove_unreadable(samples_dir: Path, seeds: Sequence[int]) -> list[int]:
    """Delete the PNGs of ``seeds`` that do not decode (truncated, garbage), each named in a warning, so
    that the run makes them again; returns their seeds."""
    bad, present = [], seeds_on_disk(samples_dir, seeds)
    for seed in (s for s in seeds if s in present):
        path = png_path(samples_dir, seed)
        why = readable_png(path)
        if why is not None:
            log.warning("%s is not a readable PNG (%s): removed, this run makes it again", path, why)
            path.unlink()
            bad.append(seed)
    return bad


def open_manifest(out_dir: Path, samples_dir: Path, identity: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest of ``out_dir`` if its model and sample config match ``identity`` (`check_identity`
    with ``adding`` False; the caller checks the rest once it knows whether images are to be added), or
    a new one, identity first, for a new folder. Images without a manifest are refused: nothing says how
    they were made."""
    path = out_dir / "manifest.json"
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the run folder is damaged: use a new --out") from err
        check_identity(out_dir, manifest, identity, adding=False)
        return manifest
    stray = sorted(samples_dir.glob("*.png")) if samples_dir.is_dir() else []
    if stray:
        raise ValueError(f"{samples_dir} holds {len(stray)} images (e.g. {stray[0].name}) but {out_dir} has no "
                         f"manifest.json saying how they were made (a run interrupted before modiff wrote its "
                         f"configuration first?): use a new --out folder, or delete those images")
    return {"identity": dict(identity), "seeds": [], "sessions": []}
