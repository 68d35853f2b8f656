"""`record(model, ...)`: forward hooks around sampling, as a context manager.

    with record(model, sites="conv,linear", reducers=[Stats(), Histogram(256)]) as rec:
        x0 = sample_ddim(model, x_T, ts, callback=rec.on_step)
    rec.stats_frame()                       # or: record(..., out_dir=DIR) saves DIR on exit

Notation: a site is one module (see `modiff.record.sites`); a_s its input (or output) at step index s
(s = 0, 1, ... in sampling order, timestep t_s descending); the difference at step s is
a_s - a_{s-1}, the paper's a_t - a_{t+1}. Every observation is keyed by (site, capture, kind, step, call):
capture "input"|"output", kind "raw"|"diff", call = index of the top-level model call within the step
(0 and 1 for a sampler that calls the model twice per step, e.g. classifier-free guidance or Heun).

Steps come from the sampler: pass `callback=rec.on_step`; it stores the step's t (a host int of
`StepInfo`, no device read) and advances the step counter. Model calls are counted by a pre-hook on the
top-level model. Between sampling runs (batches), call `rec.next_trajectory()`: steps restart at 0 and
the statistics of step s of every trajectory are merged. A site invoked k > 0 more times within one model
call is recorded as the site "<name>#k".

Hot path (no host synchronisation, a fixed number of kernels per site): the recorder keeps one float32
buffer (2, *shape) per site, capture and call index on the device; row 1 <- a_s - row 0, then row 0 <- a_s
(so row 0 holds a_{s-1} when step s arrives), and the reducers of the raw and the diff key run on both
rows at once (`modiff.record.results`). On CUDA the default engine ("auto") runs the built-in reducers as
Triton kernels instead (`modiff.record.engines.fused.engine`): one launch per site call, and the summaries and counts of
all site calls of a model call in four launches before the next model call (or before results are read).
Same results; engine="reference" keeps the torch path, which records any reducer. Results stay on the device until `stats_frame`/`save`, which
copies them to the host in one transfer per dtype.

Memory: the reducers keep small device tensors per key. The buffers take twice the float32 size of one
model call's activations at the recorded sites (12 GB for every Conv/Linear input of the CIFAR-10 UNet
at batch 256; half of it with differences=False) and are freed when the block exits. Full tensors (`tensors=TensorSpec(...)`) go to host memory and
are written to safetensors shards once they exceed `memory_budget_mb` (see `modiff.record.tensors`).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, get_args

import pandas as pd
import torch
from torch import nn

from modiff.record.engines import Engine, EngineName, check_engine, make_engine
from modiff.record.results import result_batches
from modiff.record.reducers import Reducer, default_reducers
from modiff.record.sites import SiteSpec, select_sites
from modiff.record.store import ResultKey, results_to_tables, write_recording
from modiff.record.tensors import ShardWriter, TensorSpec, tensor_key
from modiff.utils.hooks import ModelHook, attach
from modiff.utils.runs import environment

__all__ = ["Capture", "Recorder", "record"]

log = logging.getLogger(__name__)

Capture = Literal["input", "output", "both"]
FORMAT_VERSION = 1


@dataclass
class _Site:
    name: str
    module: nn.Module
    stats: bool  # reducers run on it
    tensors: bool  # full tensors are kept


HOOK_NAME = "modiff.record"  # the recorder's hooks (modiff.utils.hooks): the model's, ".input", ".output"


class _ModelCall(ModelHook):
    def __init__(self, recorder: "Recorder"):
        self.recorder = recorder

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.recorder._on_model_call()


class _SiteInput(ModelHook):
    def __init__(self, recorder: "Recorder", site: _Site):
        self.recorder, self.site = recorder, site

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.recorder._observe(self.site, "input", args)


class _SiteOutput(ModelHook):
    def __init__(self, recorder: "Recorder", site: _Site):
        self.recorder, self.site = recorder, site

    def post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.recorder._observe(self.site, "output", output)


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The observed tensor: the value itself, or the first tensor of a tuple/list (first positional arg)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _describe_model(model: nn.Module) -> dict[str, Any]:
    describe = getattr(model, "describe", None)
    out = dict(describe()) if callable(describe) else {"class": type(model).__name__}
    out.setdefault("parameters", sum(p.numel() for p in model.parameters()))
    quant = getattr(model, "quant_config", None)
    if quant is not None and callable(getattr(quant, "to_dict", None)):
        out["quant_config"] = quant.to_dict()
        out["quant_backend"] = getattr(quant, "backend", "simulated")
    return out


def _check_empty_dir(path: Path) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not an empty directory; a recording needs a new or empty "
                         f"directory. Choose another out_dir (--out), or delete the old one.")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Recorder:
    """Hooks, counters and accumulated statistics of one recording; made by `record(...)`."""

    def __init__(self, model: nn.Module, sites: SiteSpec = "conv,linear", reducers: Optional[Sequence[Reducer]] = None,
                 *, capture: Capture = "input", tensors: Optional[TensorSpec] = None, out_dir: Optional[str | Path] = None,
                 memory_budget_mb: float = 512, differences: bool = True, metadata: Optional[Mapping[str, Any]] = None,
                 engine: EngineName = "auto"):
        if capture not in get_args(Capture):
            raise ValueError(f"capture must be one of {', '.join(get_args(Capture))}; got {capture!r}")
        self.reducers = list(default_reducers() if reducers is None else reducers)
        if not all(isinstance(r, Reducer) for r in self.reducers):
            raise TypeError(f"reducers must be Reducer instances (Stats(), Histogram(256), ...), got {self.reducers!r}")
        names = [r.name for r in self.reducers]
        if len(set(names)) != len(names):
            raise ValueError(f"reducer names must be unique, got {names}; pass name=... to tell them apart")
        if tensors is not None and not isinstance(tensors, TensorSpec):
            raise TypeError(f"tensors must be a TensorSpec(sites=..., steps=..., samples=...), got {tensors!r}")
        if tensors is not None and out_dir is None:
            raise ValueError("tensors=TensorSpec(...) spills full tensors to disk: pass out_dir=...")
        if memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
        check_engine(engine, self.reducers)  # a bad engine or unsupported reducers fail here, not at the first call
        self.model, self.capture, self.differences, self.engine = model, capture, differences, engine
        self._engine: Optional[Engine] = None  # chosen at the first observation, by `engine` and the device
        self.tensor_spec, self.memory_budget_mb = tensors, float(memory_budget_mb)
        self.metadata = dict(metadata or {})
        self.sites = self._build_sites(sites)  # a bad spec fails before any directory is made
        self.out_dir = None if out_dir is None else _check_empty_dir(Path(out_dir))
        self._writer = None if tensors is None else ShardWriter(self.out_dir, int(self.memory_budget_mb * 2**20))
        self._hooks: Optional[contextlib.ExitStack] = None
        self._reducers: dict[ResultKey, list[Reducer]] = {}
        self._shared: dict[tuple[str, str, str], dict[str, Any]] = {}
        # (site, capture, call) -> (step of row 0, buffer (2, *shape) float32: [a_step, a_step - a_step-1])
        self._prev: dict[tuple[str, str, int], tuple[Optional[int], torch.Tensor]] = {}
        self._rows: dict[tuple[str, str, int], int] = {}  # rows of dim 0 seen in this trajectory
        self._offsets: dict[tuple[str, str, int], int] = {}  # sample index of row 0 in this trajectory
        self._invocations: dict[tuple[str, str], int] = {}
        self._warned: set[str] = set()
        self._tensor_steps: set[int] = set()
        self.timesteps: dict[int, int] = {}  # step index -> t
        self.step = self.trajectory = self.model_calls = 0
        self._call = self._calls_in_step = 0
        self.shapes: dict[str, dict[str, list[int]]] = {}
        self.device: Optional[torch.device] = None
        self.seconds = 0.0
        self._started: Optional[float] = None

    def _build_sites(self, spec: SiteSpec) -> list[_Site]:
        stat_names = set(select_sites(self.model, spec))
        tensor_names = set() if self.tensor_spec is None else set(select_sites(self.model, self.tensor_spec.sites))
        return [_Site(name, module, name in stat_names, name in tensor_names)
                for name, module in self.model.named_modules() if name in stat_names | tensor_names]

    # -- context ---------------------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        if self._hooks is not None:
            raise RuntimeError("this recorder is already active; make a new one with record(...)")
        self._started = time.time()
        with contextlib.ExitStack() as stack:  # a hook that fails to register removes the others
            stack.enter_context(attach(HOOK_NAME, [(self.model, _ModelCall(self))]))
            if self.capture in ("input", "both"):
                stack.enter_context(attach(HOOK_NAME + ".input", [(s.module, _SiteInput(self, s)) for s in self.sites]))
            if self.capture in ("output", "both"):
                stack.enter_context(attach(HOOK_NAME + ".output", [(s.module, _SiteOutput(self, s)) for s in self.sites]))
            self._hooks = stack.pop_all()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._remove_hooks()
        if self._engine is not None:  # the pending work of the last model call, before its buffers go
            self._engine.flush() if exc_type is None else self._engine.discard()
        self._prev.clear()  # frees the activation buffers
        self.seconds += time.time() - (self._started or time.time())
        if exc_type is not None:
            log.warning("recording stopped by %s; nothing saved", exc_type.__name__)
            return
        if self._writer is not None:
            self._writer.flush()
        if self.model_calls > 1 and not self.timesteps:
            log.warning("the model was called %d times but on_step never: every call was recorded as step 0. "
                        "Pass callback=rec.on_step to the sampler.", self.model_calls)
        if self.out_dir is not None:
            self.save()

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    # -- sampler side ----------------------------------------------------------------------------------
    def on_step(self, info: Any) -> None:
        """Sampler callback (`callback=rec.on_step`): ends step `info.index` at timestep `info.t`."""
        index, t = int(getattr(info, "index", self.step)), int(info.t)
        if index != self.step:
            raise ValueError(f"on_step got step index {index} while the recorder is at step {self.step}: call "
                             f"rec.next_trajectory() between sampling runs, and pass callback=rec.on_step from the first step")
        known = self.timesteps.setdefault(self.step, t)
        if known != t:
            raise ValueError(f"step {self.step} ran at t={t} in this trajectory but at t={known} before; "
                             f"the trajectories of one recording must use the same timesteps")
        self.step += 1
        self._call = self._calls_in_step = 0
        self._invocations.clear()

    def next_trajectory(self) -> None:
        """Start a new sampling run (batch): steps restart at 0, sample indices continue."""
        if self.step == 0 and not self._rows:
            return
        for key, rows in self._rows.items():
            self._offsets[key] = self._offsets.get(key, 0) + rows
        self._rows.clear()
        self._prev = {key: (None, buffer) for key, (_, buffer) in self._prev.items()}  # buffers reused
        self.trajectory += 1
        self.step = self._call = self._calls_in_step = 0
        self._invocations.clear()

    # -- hooks -----------------------------------------------------------------------------------------
    def _on_model_call(self) -> None:
        if self._engine is not None:  # finish the previous call before its scratch is reused
            self._engine.flush()
        self._call = self._calls_in_step
        self._calls_in_step += 1
        self.model_calls += 1
        self._invocations.clear()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _observe(self, site: _Site, capture: str, value: Any) -> None:
        x = _first_tensor(value)
        if x is None:
            self._warn_once(f"notensor:{site.name}:{capture}", "site %s has no tensor %s; skipped", site.name, capture)
            return
        k = self._invocations.get((site.name, capture), 0)
        self._invocations[(site.name, capture)] = k + 1
        name = site.name if k == 0 else f"{site.name}#{k}"
        step, call = self.step, self._call
        if self.device is None:
            self.device = x.device
        self.shapes.setdefault(name, {}).setdefault(capture, list(x.shape))
        rows_key = (name, capture, call)
        self._rows[rows_key] = max(self._rows.get(rows_key, 0), x.shape[0] if x.ndim else 1)
        if site.tensors and self.tensor_spec.wants_step(step):
            self._keep_tensor(name, capture, step, call, x)
        if site.stats:
            self._reduce(name, capture, step, call, x)

    def _keep_tensor(self, name: str, capture: str, step: int, call: int, x: torch.Tensor) -> None:
        offset = self._offsets.get((name, capture, call), 0)
        rows = self.tensor_spec.rows(offset, x.shape[0] if x.ndim else 1)
        if rows:
            self._tensor_steps.add(step)
            self._writer.add(tensor_key(name, capture, step, call), self.trajectory, x, rows, [offset + r for r in rows])

    def _reduce(self, name: str, capture: str, step: int, call: int, x: torch.Tensor) -> None:
        """Copy a_s into the site's buffer (after a_s - a_{s-1} where a_{s-1} is there) and reduce both rows."""
        x = x.detach()
        slot = self._prev.get((name, capture, call))
        buffer = None if slot is None else slot[1]
        if buffer is None or buffer.shape[1:] != x.shape:
            if buffer is not None and slot[0] == step - 1:
                self._warn_once(f"shape:{name}", "site %s changed shape %s -> %s between steps; no difference",
                                name, tuple(buffer.shape[1:]), tuple(x.shape))
            buffer = torch.empty((1 + self.differences, *x.shape), dtype=torch.float32, device=x.device)
        diff = self.differences and slot is not None and slot[0] == step - 1 and buffer is slot[1]
        self._prev[(name, capture, call)] = (step, buffer)
        rows = [self._reducers_of((name, capture, "raw", step, call))]
        if diff:
            rows.append(self._reducers_of((name, capture, "diff", step, call)))
        if self._engine is None:
            self._engine = make_engine(self.engine, self.reducers, x.device)
        self._engine.update((name, capture), rows, buffer, x, diff)

    def _reducers_of(self, key: ResultKey) -> list[Reducer]:
        reducers = self._reducers.get(key)
        if reducers is None:
            shared = self._shared.setdefault(key[:3], {})
            reducers = self._reducers[key] = [r.spawn(shared) for r in self.reducers]
        return reducers

    # -- results ---------------------------------------------------------------------------------------
    def _tables(self) -> tuple[pd.DataFrame, dict[str, Any]]:
        order = {name: i for i, name in enumerate(self.shapes)}  # sites in order of first observation

        def position(key: ResultKey) -> tuple[Any, ...]:
            site, capture, kind, step, call = key
            return order.get(site, len(order)), step, call, capture, kind != "raw"

        if self._engine is not None:
            self._engine.flush()
        keys = sorted(self._reducers, key=position)
        names = [r.name for r in self.reducers]  # every key has one reducer per template, in this order
        batches = result_batches([r for key in keys for r in self._reducers[key]])
        return results_to_tables([key for key in keys for _ in names], names * len(keys), batches, self.timesteps)

    def stats_frame(self) -> pd.DataFrame:
        """The statistics so far as a DataFrame (columns `modiff.record.store.STATS_COLUMNS`)."""
        return self._tables()[0]

    def _manifest(self) -> dict[str, Any]:
        steps = sorted({k[3] for k in self._reducers} | set(self.timesteps) | self._tensor_steps)
        return {
            "format": "modiff-recording", "version": FORMAT_VERSION,
            "sites": [{"name": n, "shapes": shapes} for n, shapes in self.shapes.items()],
            "stat_sites": [s.name for s in self.sites if s.stats],
            "tensor_sites": [s.name for s in self.sites if s.tensors],
            "capture": self.capture, "differences": self.differences,
            "engine": "reference" if self._engine is None else self._engine.name,
            "count_kernel": None if self._engine is None else self._engine.count_kernel(),
            "reducers": [r.describe() for r in self.reducers],
            "steps": steps, "timesteps": [self.timesteps.get(s) for s in steps],
            "trajectories": self.trajectory + (1 if self.step or self._rows else 0),
            "model_calls": self.model_calls,
            "tensors": None if self.tensor_spec is None else self.tensor_spec.to_dict(),
            "memory_budget_mb": self.memory_budget_mb,
            "model": _describe_model(self.model), "metadata": self.metadata,
            "environment": environment(self.device), "seconds": round(self.seconds, 3),
        }

    def save(self, out_dir: Optional[str | Path] = None) -> Path:
        """Write the recording directory (default: the out_dir given to record) and return its path."""
        if self._hooks is not None:
            raise RuntimeError("save() after the `with record(...)` block: the recorder is still active")
        if out_dir is None and self.out_dir is None:
            raise ValueError("no directory: pass out_dir to save(...) or to record(...)")
        target = Path(out_dir) if out_dir is not None else self.out_dir
        if self.out_dir is None or target.resolve() != self.out_dir.resolve():
            _check_empty_dir(target)
            for shard in (self._writer.shards if self._writer else []):
                shutil.copy2(self.out_dir / shard, target / shard)
        stats, arrays = self._tables()
        index = None if self._writer is None else self._writer.index()
        write_recording(target, self._manifest(), stats, arrays, index)
        log.info("recording of %d sites, %d steps saved to %s", len(self.shapes), len(set(stats["step"])), target)
        return target


def record(model: nn.Module, sites: SiteSpec = "conv,linear", reducers: Optional[Sequence[Reducer]] = None, *,
           capture: Capture = "input", tensors: Optional[TensorSpec] = None, out_dir: Optional[str | Path] = None,
           memory_budget_mb: float = 512, differences: bool = True,
           metadata: Optional[Mapping[str, Any]] = None, engine: EngineName = "auto") -> Recorder:
    """Record per-(site, step, call) statistics, and optionally full tensors, of `model` during sampling.

    Use as `with record(model, ...) as rec:` around a sampler called with `callback=rec.on_step`.
    sites: a site spec (see `select_sites`; default every Conv/Linear, what a quantizer sees).
    reducers: streaming statistics (default `default_reducers()`), each spawned afresh per key.
    capture: the module's "input" (first positional argument), "output" (first tensor), or "both".
    tensors: which full tensors to keep (needs out_dir). out_dir: a new or empty directory; the recording
    is saved there on a clean exit. memory_budget_mb: host memory for buffered full tensors before they are
    written to a shard. differences: also reduce a_s - a_{s-1} (keeps one tensor per site and call on the
    device). metadata: JSON-friendly extras for the manifest. engine: "auto" (default: the Triton kernels
    on CUDA when every reducer is a built-in they support, else the torch path), "reference" (the torch
    path) or "fused" (the Triton kernels; on a CPU only with TRITON_INTERPRET=1). The manifest records the
    engine used. Hooks are removed on exit, also on errors.
    """
    return Recorder(model, sites, reducers, capture=capture, tensors=tensors, out_dir=out_dir,
                    memory_budget_mb=memory_budget_mb, differences=differences, metadata=metadata, engine=engine)
