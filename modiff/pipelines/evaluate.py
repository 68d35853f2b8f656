"""Sample N images for a model and quantization preset, score them, write metrics.json (resumable)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from modiff.utils.distributed import World
from modiff.pipelines.generate import SampleConfig, generate
from modiff.metrics.compare import fidelity_to_reference
from modiff.metrics.fidelity import EXTRACTOR, Metric, compute_metrics
from modiff.utils.rng import format_seeds
from modiff.utils.runs import environment, write_json

__all__ = ["evaluate", "seed_images", "check_reference_run"]

REFERENCE_FIELDS = ("sampler", "steps", "spacing", "eta")

log = logging.getLogger(__name__)


def seed_images(run_dir: Path, seeds: Sequence[int]) -> np.ndarray:
    """Images of the given seeds from a run directory's samples.npz, in the order of `seeds`; from a run's
    summary (`modiff.pipelines.summary`), the images it keeps (images.npz)."""
    summary = not (Path(run_dir) / "samples.npz").is_file() and (Path(run_dir) / "images.npz").is_file()
    with np.load(Path(run_dir) / ("images.npz" if summary else "samples.npz")) as data:
        index = {int(s): i for i, s in enumerate(data["seeds"])}
        missing = [s for s in seeds if s not in index]
        named = f"{missing[:5]}{'...' if len(missing) > 5 else ''}"
        if missing and summary:
            kept = format_seeds(index) if index else "none"
            raise ValueError(f"{run_dir} is a summary that keeps the images of seeds {kept} only, not {named}: use "
                             f"the full run, or summarize it keeping more images (`modiff summarize --images N`)")
        if missing:
            raise ValueError(f"{run_dir} lacks seeds {named}")
        return data["images"][[index[s] for s in seeds]]


def _model_name(identity: dict[str, Any]) -> Optional[str]:
    """The model a run identity names: `modiff sample` stores the --model argument (a preset, or a path
    whose last part is the model's name), `evaluate` and `generate` the model's name."""
    named = identity.get("model", identity.get("name"))
    return None if named is None else Path(str(named)).name


def check_reference_run(fp_run: str | Path, seeds: Sequence[int], config: SampleConfig, model_name: str) -> None:
    """Refuse a reference run that did not sample ``seeds`` with this model, sampler, steps, spacing and
    eta: its per-seed comparison would measure the difference of the settings, not of the quantization."""
    path = Path(fp_run) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"--fp-run {fp_run} is not a run folder (no manifest.json); give a run made by `modiff sample`")
    manifest = json.loads(path.read_text())
    ref = manifest.get("identity", {})
    ref_sample, here = ref.get("sample", {}), asdict(config)
    diff = [f"{k}: {ref_sample.get(k)!r} -> {here[k]!r}" for k in REFERENCE_FIELDS if ref_sample.get(k) != here[k]]
    ref_model = _model_name(ref.get("model", {}))
    if ref_model != Path(model_name).name:
        diff.append(f"model: {ref_model!r} -> {Path(model_name).name!r}")
    if diff:
        raise ValueError(f"--fp-run {fp_run} was sampled with other settings (reference -> this run: {'; '.join(diff)}); "
                         f"give a full-precision run of the same model, sampler, steps, spacing and eta")
    missing = sorted(set(seeds) - set(manifest.get("seeds", [])))
    if missing:
        raise ValueError(f"--fp-run {fp_run} lacks {len(missing)} of the seeds (e.g. {format_seeds(missing[:5])}); "
                         f"sample them into it first (`modiff sample` with its settings and --out {fp_run})")


def evaluate(model: torch.nn.Module, seeds: Sequence[int], out_dir: str | Path, config: SampleConfig, *,
             quant_preset: Optional[str] = None, ref: str = "fmnist-train",
             metrics: Sequence[Metric] = ("fid", "isc", "kid", "prc"), fp_run: Optional[str | Path] = None,
             batch_size: int = 64, device: str = "auto", compile: Optional[bool] = None,
             cuda_graphs: Optional[bool] = None, progress: bool = True) -> dict[str, Any]:
    """Generate (skipping seeds on disk), score against `ref`, and compare with `fp_run` per seed (refused
    when `fp_run` was sampled with another model, sampler, steps, spacing or eta, or lacks seeds).
    ``compile`` and ``cuda_graphs`` as `generate` takes them (None: the device's default); ``progress``
    shows progress bars while sampling and extracting features."""
    from modiff.quant import presets, quantize, trajectory
    from modiff.utils.device import resolve_device

    config = config.resolved(resolve_device(device))

    identity: dict[str, Any] = {"model": getattr(model, "name", type(model).__name__), "quant_preset": quant_preset}
    if fp_run is not None:
        check_reference_run(fp_run, seeds, config, identity["model"])  # before any sampling
    prepare = None
    if quant_preset is not None:
        quant = presets[quant_preset]
        model = quantize(model, quant)
        identity["quant_config"] = quant.to_dict()
        prepare = trajectory
    out = generate(model, seeds, out_dir, config, batch_size=batch_size, device=device, identity=identity,
                   prepare=prepare, compile=compile, cuda_graphs=cuda_graphs, progress=progress)
    # Under torch.distributed every rank sampled its share; rank 0 scores and every rank returns its result.
    return World.current().from_leader(lambda: _score(out, seeds, config, identity, ref, metrics, fp_run, progress))


def _score(out: Path, seeds: Sequence[int], config: SampleConfig, identity: dict[str, Any], ref: str,
           metrics: Sequence[Metric], fp_run: Optional[str | Path], progress: bool) -> dict[str, Any]:
    images = seed_images(out, seeds)
    result: dict[str, Any] = {"metrics": compute_metrics(images, ref, metrics, device="cpu", progress=progress)}
    if fp_run is not None:
        result["fidelity_to_fp"] = {"fp_run": str(fp_run), **fidelity_to_reference(images, seed_images(Path(fp_run), seeds))}
    import torch_fidelity

    result.update({
        "num_samples": len(seeds), "seeds": format_seeds(seeds),
        "sample_config": asdict(config), "model": identity, "feature_extractor": EXTRACTOR,
        "torch_fidelity": torch_fidelity.__version__, "reference": ref, "environment": environment(),
    })
    write_json(result, out / "metrics.json")
    return result
