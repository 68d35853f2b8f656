"""`record_sampling`: sample seeds in batches under a recorder and save the recording (`modiff record`)."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

from torch import nn

from modiff.pipelines.generate import SampleConfig, sample
from modiff.utils.device import resolve_device
from modiff.record.recorder import record
from modiff.record.reducers import Reducer
from modiff.record.sites import SiteSpec
from modiff.record.tensors import TensorSpec
from modiff.utils.rng import format_seeds

__all__ = ["record_sampling"]

log = logging.getLogger(__name__)


def record_sampling(model: nn.Module, seeds: Sequence[int], out_dir: str | Path, config: SampleConfig = SampleConfig(),
                    *, sites: SiteSpec = "conv,linear", reducers: Optional[Sequence[Reducer]] = None,
                    tensors: Optional[TensorSpec] = None, batch_size: int = 64, device: str = "auto",
                    memory_budget_mb: float = 512, prepare: Optional[Callable[[nn.Module], ContextManager]] = None,
                    metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Sample `seeds` (in batches; each batch one trajectory) while recording, and save into `out_dir`.

    `out_dir` must be new or empty. `prepare(model)` is entered around each batch (e.g. modiff.trajectory
    for modulated models). Sample indices of `tensors.samples` are positions in `seeds`. The network runs
    in `config`'s precision ("auto": bf16 autocast on CUDA), eagerly and in the default memory format: the
    recorder's hooks see every layer call and read its tensors in that order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = [int(s) for s in seeds]
    dev = resolve_device(device)
    config = config.resolved(dev)
    model = model.to(dev).eval()
    meta = {"seeds": format_seeds(seeds), "sample": asdict(config), "batch_size": batch_size, **dict(metadata or {})}
    with record(model, sites, reducers, tensors=tensors, out_dir=out_dir, memory_budget_mb=memory_budget_mb,
                metadata=meta) as rec:
        for i in range(0, len(seeds), batch_size):
            batch = seeds[i : i + batch_size]
            log.info("recording seeds %s", format_seeds(batch))
            with prepare(model) if prepare else nullcontext():
                sample(model, batch, config, dev, callback=rec.on_step)
            rec.next_trajectory()
    return Path(out_dir)
