"""Sample N images for a model and quantization preset, score them, write metrics.json (resumable)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from modiff.pipelines.generate import SampleConfig, generate
from modiff.metrics.compare import fidelity_to_reference
from modiff.metrics.fidelity import EXTRACTOR, Metric, compute_metrics
from modiff.utils.rng import format_seeds
from modiff.utils.runs import environment, write_json

__all__ = ["evaluate", "seed_images"]

log = logging.getLogger(__name__)


def seed_images(run_dir: Path, seeds: Sequence[int]) -> np.ndarray:
    """Images of the given seeds from a run directory's samples.npz, in the order of `seeds`."""
    with np.load(Path(run_dir) / "samples.npz") as data:
        index = {int(s): i for i, s in enumerate(data["seeds"])}
        missing = [s for s in seeds if s not in index]
        if missing:
            raise ValueError(f"{run_dir} lacks seeds {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return data["images"][[index[s] for s in seeds]]


def evaluate(model: torch.nn.Module, seeds: Sequence[int], out_dir: str | Path, config: SampleConfig, *,
             quant_preset: Optional[str] = None, ref: str = "fmnist-train",
             metrics: Sequence[Metric] = ("fid", "isc", "kid", "prc"), fp_run: Optional[str | Path] = None,
             batch_size: int = 64, device: str = "auto", compile: bool = False) -> dict[str, Any]:
    """Generate (skipping seeds on disk), score against `ref`, and compare with `fp_run` per seed."""
    from modiff.quant import presets, quantize, trajectory

    identity: dict[str, Any] = {"model": getattr(model, "name", type(model).__name__), "quant_preset": quant_preset}
    prepare = None
    if quant_preset is not None:
        quant = presets[quant_preset]
        model = quantize(model, quant)
        identity["quant_config"] = quant.to_dict()
        prepare = trajectory
    out = generate(model, seeds, out_dir, config, batch_size=batch_size, device=device, identity=identity,
                   prepare=prepare, compile=compile)
    images = seed_images(out, seeds)
    result: dict[str, Any] = {"metrics": compute_metrics(images, ref, metrics, device="cpu")}
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
