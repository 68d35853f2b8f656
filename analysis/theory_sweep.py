"""Theorems 4.3 and 4.4 on every Conv/Linear layer: one streaming pass over sampling trajectories.

The full-precision model samples a batch of trajectories; a forward pre-hook on each selected layer
hands its exact input a_i (sampling index i, one model call per step) to a per-layer simulator, which
replays the layer's activation quantization under every (quantizer, bit width) at once and keeps only
per-trajectory scalars. Memory is the simulator state of one step (a_{i-1}, and per quantizer a_hat and
the accumulated rounding error E), never a layer's inputs over all steps; `SweepConfig.layers_per_pass`
splits the layers over several sampling passes when that state is too large. (The recorder in
`modiff.record` summarises a_i and a_i - a_{i-1}; the MoDiff residual a_i - a_hat_{i-1} needs a state
per quantizer that its reducers do not carry, hence these hooks.)

Notation as in `analysis.propagation` and `analysis.bounds` (i = 0 is the exact warm-up step, paper
t = T - i). Every quantity is per trajectory (one sample s of the batch; norms over that sample's part
of the tensor); ``A`` is the layer without bias, r the residual handed to Q, delta = r - Q(r):

==================  ==================================================================================
``diff_sq``         d_i = ||a_i - a_{i-1}||^2
``residual_sq_noec``  ||r_i||^2, standard modulation, r_i = a_i - a_{i-1}
``rounding_sq_noec``  ||delta_i||^2; E_i = E_{i-1} + delta_i (E_0 = 0), ``err_sq_noec`` = ||A E_i||^2
``residual_sq_ec``  ||r_i||^2, MoDiff, r_i = a_i - a_hat_{i-1}; a_hat_i = a_hat_{i-1} + Q(r_i)
``rounding_sq_ec``  ||delta_i||^2; ``err_sq_ec`` = ||A delta_i||^2 = ||o_i - o_hat_i||^2 (error feedback)
``thm43_bound_*``   Theorem 4.3 for that residual: sum over its elements of s^2 / 4 (round to nearest),
                    s the scale Q used for the element
``thm43_own_bound_*``  The same sum (s^2 / 4 per element; s^2 if Q floors) with s = (max - min) / (2^b - 1)
                    of the values Q took its range from (the sample's, or per tensor the batch's): Theorem
                    4.3's proof for rounding to nearest in the data's own range,
                    `analysis.propagation.theorem43_own_range_bound`
``thm43_printed_bound_*``  Theorem 4.3 as printed, s^2 d (the paper's floor rounding) in the data's own range
==================  ==================================================================================

Quantizers (`QuantizerName`): ``per-sample`` is this toolkit's default (asymmetric min-max, one scale
per sample); ``per-tensor`` is the published one (symmetric with the published clamp, one scale for
the whole batch tensor, so a trajectory's rounding depends on the others sampled with it: the batch is
`SweepConfig.batch_size` trajectories, the calibration and the held-out ones never share a batch).
The errors of held-out trajectories need A applied to every E and delta (two layer calls per
quantizer and step, batched); calibration trajectories only need the residuals (``err_sq_*`` NaN).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Literal, Mapping, Optional, Sequence, Union, get_args

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

import modiff as md
from analysis.experiments import paper_spacing
from analysis.propagation import LinearOperator, linear_operator, operator_norm
from modiff.diffusion.schedules import Spacing
from modiff.pipelines.execution import float32_precision
from modiff.utils.device import resolve_device
from modiff.utils.hooks import ModelHook, attach
from modiff.quant.primitives import QuantSpec, fake_quantize, qparams_from_range, reduce_range

__all__ = [
    "QuantizerName", "Role", "STAT_COLUMNS", "SweepConfig", "layer_input_shapes", "operator_norms",
    "quantizer_spec", "select_layers", "sweep_trajectories",
]

log = logging.getLogger(__name__)

QuantizerName = Literal["per-sample", "per-tensor"]
Role = Literal["calibration", "held-out"]
STAT_COLUMNS: tuple[str, ...] = (
    "residual_sq_noec", "rounding_sq_noec", "thm43_bound_noec", "thm43_own_bound_noec", "thm43_printed_bound_noec",
    "err_sq_noec",
    "residual_sq_ec", "rounding_sq_ec", "thm43_bound_ec", "thm43_own_bound_ec", "thm43_printed_bound_ec", "err_sq_ec",
)
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def quantizer_spec(name: QuantizerName, bits: int) -> QuantSpec:
    """The activation quantizer ``name`` at ``bits`` (dynamic: qparams from the tensor it quantizes)."""
    if name == "per-sample":
        return QuantSpec(bits=bits, granularity="sample")
    if name == "per-tensor":
        return QuantSpec(bits=bits, scheme="symmetric-published", granularity="tensor")
    raise ValueError(f"quantizer must be one of {get_args(QuantizerName)}, got {name!r}")


@dataclass(frozen=True)
class SweepConfig:
    """What `sweep_trajectories` simulates and how it samples.

    ``batch_size`` trajectories are sampled together (the per-tensor quantizer's batch);
    ``layers_per_pass`` 0 simulates every layer in one sampling pass, else that many per pass (less
    memory, more sampling); ``dtype`` of the simulation (the sampling itself runs in float32)."""

    bits: tuple[int, ...] = (8, 6, 4, 3)
    quantizers: tuple[QuantizerName, ...] = ("per-sample", "per-tensor")
    steps: int = 20
    spacing: Optional[Spacing] = None
    batch_size: int = 64
    layers_per_pass: int = 0
    dtype: Literal["float32", "float64"] = "float64"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.bits or any(not 2 <= b <= 16 for b in self.bits):
            raise ValueError(f"bits must be a non-empty list of widths in [2, 16], got {self.bits}")
        for name in self.quantizers:
            quantizer_spec(name, 8)
        if not self.quantizers:
            raise ValueError(f"quantizers must name at least one of {get_args(QuantizerName)}")
        if self.steps < 2 or self.batch_size < 1 or self.layers_per_pass < 0:
            raise ValueError(f"need steps >= 2, batch_size >= 1, layers_per_pass >= 0; got steps={self.steps}, "
                             f"batch_size={self.batch_size}, layers_per_pass={self.layers_per_pass}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def configs(self) -> list[tuple[QuantizerName, int]]:
        """(quantizer, bits) in the order of the simulators' first axis."""
        return [(q, b) for q in self.quantizers for b in self.bits]


class _OnInput(ModelHook):
    """Calls ``fn`` with the first input of its module (what the module computes from is not changed)."""

    def __init__(self, fn: Callable[[Tensor], object]):
        self.fn = fn

    def pre_forward(self, module: nn.Module, args: tuple) -> None:
        self.fn(args[0])


def _pre_hooks(model: nn.Module, hooks: Mapping[str, Callable[[Tensor], object]]) -> ContextManager[None]:
    return attach("analysis.theory_sweep", [(model.get_submodule(name), _OnInput(fn)) for name, fn in hooks.items()])


@torch.no_grad()
def layer_input_shapes(model: nn.Module, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The input shape (1, ...) of each layer in one denoiser call on one sample; layers the denoiser
    does not call (a latent model's first stage) are left out."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = {name: (lambda a, name=name: shapes.setdefault(name, tuple(a.shape))) for name in layers}
    device = next(model.parameters()).device
    with _pre_hooks(model, hooks):
        model(torch.zeros(1, *model.sample_shape, device=device), torch.full((1,), 500, device=device))
    return {name: shapes[name] for name in layers if name in shapes}


def select_layers(model: nn.Module, layers: Union[Literal["all"], Sequence[str]] = "all") -> list[str]:
    """``"all"``: every Conv1d/Conv2d/Linear of the denoising network (`Denoiser.network_modules`) that
    one model call reaches, in module order; else the names given
    (each must be such a layer)."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of layer names, got {layers!r}")
        modules = model.network_modules() if hasattr(model, "network_modules") else model.named_modules()
        names = [n for n, m in modules if isinstance(m, _LAYER_TYPES)]
        return list(layer_input_shapes(model, names))
    bad = [n for n in layers if not isinstance(dict(model.named_modules()).get(n), _LAYER_TYPES)]
    if bad:
        raise ValueError(f"not Conv1d/Conv2d/Linear layers of the model: {bad}; use layers='all' or names "
                         "from model.named_modules()")
    return list(layers)


def _weight_digest(weight: Tensor) -> str:
    return hashlib.sha1(weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def operator_norms(model: nn.Module, layers: Sequence[str], cache: Optional[Union[str, Path]] = None,
                   iters: int = 300, tol: float = 1e-6, device: str = "cpu") -> dict[str, float]:
    """||A|| of each layer, the spectral norm of its linear map on ONE sample's input (bias excluded).

    Linear: the largest singular value of W (SVD). Conv: `analysis.propagation.operator_norm`, power
    iteration on A^T A, accelerated by Lanczos, with the conv as a linear map of the layer's real input
    shape (padding and stride make the norm depend on it), A^T its vector-Jacobian product; the estimate
    rises to ||A|| from below and stops when the Ritz residual is below ``tol`` (relative). Results are cached in the JSON file ``cache`` (keyed by layer,
    input shape, a digest of the weight and the iteration settings), so a re-run does not iterate again.
    The iterations run on ``device`` (a copy of each layer there; the model stays where it is).
    """
    path = Path(cache) if cache is not None else None
    known = json.loads(path.read_text()) if path is not None and path.exists() else {}
    shapes = layer_input_shapes(model, layers)
    norms, dev = {}, resolve_device(device)
    for name in layers:
        if name not in shapes:
            raise ValueError(f"layer {name!r} is not called by the denoiser; pick layers with select_layers")
        layer = model.get_submodule(name)
        key = f"{name}|{shapes[name]}|{_weight_digest(layer.weight)}|{iters}|{tol:g}"
        if key not in known:
            on_device = layer if dev.type == "cpu" else copy.deepcopy(layer).to(dev)
            known[key] = operator_norm(on_device, input_shape=shapes[name], iters=iters, tol=tol)
        norms[name] = float(known[key])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, sort_keys=True))
    return norms


def _sum_sq(x: Tensor, dims_kept: int) -> Tensor:
    return x.flatten(dims_kept).square().sum(dims_kept)  # sum of squares over all but the first dims_kept dims


class _LayerSimulator:
    """Streaming simulation of one layer on one batch of trajectories, every (quantizer, bits) at once.

    The state of the K = len(specs) configurations is stacked, (K, B, ...), so a step is a few elementwise
    kernels over the stack; only the qparams (one scale per sample or per batch, tiny tensors) are computed
    per configuration, by `qparams_from_range` itself, so every rounding is the one the quantizer makes."""

    def __init__(self, op: LinearOperator, specs: Sequence[QuantSpec], errors: bool, dtype: torch.dtype):
        if len({spec.rounding for spec in specs}) != 1 or any(s.granularity not in ("sample", "tensor") for s in specs):
            raise ValueError("the specs of one sweep must share their rounding and quantize per sample or per tensor, "
                             f"got {[(s.rounding, s.granularity) for s in specs]}")
        self.op, self.specs, self.errors, self.dtype = op.to(dtype), list(specs), errors, dtype
        self.a_prev: Optional[Tensor] = None
        self.a_hat: Optional[Tensor] = None  # (K, B, ...)
        self.acc: Optional[Tensor] = None  # E, (K, B, ...) (held-out only)
        self.grid: Optional[tuple[Tensor, Tensor]] = None  # qmin, qmax per spec, (K, 1, ...)
        self.layout = torch.contiguous_format  # the layer input's: conv kernels, and their rounding, follow it
        self.rows: list[Tensor] = []  # per quantized step: (1 + len(STAT_COLUMNS), K, B)

    def _start(self, a: Tensor) -> None:
        """The warm-up step: exact, a_hat = a, E = 0."""
        k, shape = len(self.specs), (len(self.specs),) + (1,) * a.ndim
        self.a_prev, self.a_hat = a, a.expand(k, *a.shape).clone()
        self.acc = torch.zeros_like(self.a_hat) if self.errors else None
        if a.ndim == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
            self.layout = torch.channels_last
        bounds = [[float(spec.qmin) for spec in self.specs], [float(spec.qmax) for spec in self.specs]]
        qmin, qmax = torch.tensor(bounds, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
        self.grid = (qmin.to(a.device).view(shape), qmax.to(a.device).view(shape))

    def _runs(self) -> list[tuple[slice, str]]:
        """Consecutive specs of one granularity, (slice of K, granularity)."""
        runs, start = [], 0
        for granularity, members in itertools.groupby(spec.granularity for spec in self.specs):
            n = len(list(members))
            runs.append((slice(start, start + n), granularity))
            start += n
        return runs

    def _round(self, r: Tensor, shared: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Q(r) per spec (K, B, ...) of residuals r (K, B, ...), and three per-sample Theorem 4.3 bounds (K, B):
        the sum of s^2 / 4 over the sample's elements with the scale Q used, the same with the step of the data's
        own range, (max - min) / (2^b - 1), and the printed s^2 d with that step. ``shared``: r[k] is the same
        tensor for every k, so its ranges are reduced once. Min and max are exact, so ranges reduced over a run
        of specs are the ones `reduce_range` gives each spec."""
        scales, zero_points, own_steps = [], [], []
        for run, granularity in self._runs():
            part = r[:1] if shared else r[run]
            dims = tuple(range(2 if granularity == "sample" else 1, part.ndim))
            x_min, x_max = part.amin(dims, keepdim=True), part.amax(dims, keepdim=True)
            for i, spec in enumerate(self.specs[run]):
                j = 0 if shared else i
                scale, zero_point = qparams_from_range(x_min[j], x_max[j], spec)
                scales.append(scale.expand(r.shape[1], *scale.shape[1:]))
                zero_points.append(zero_point.expand(r.shape[1], *scale.shape[1:]))
                own_steps.append(((x_max[j] - x_min[j]) / (2**spec.bits - 1)).expand(r.shape[1], *scale.shape[1:]))
        scale, zero_point = torch.stack(scales), torch.stack(zero_points)
        spec = self.specs[0]
        q = fake_quantize(r, scale, zero_point, spec, grid=(None, *self.grid))
        per_sample = r[0, 0].numel() / (4.0 if spec.rounding == "nearest" else 1.0)
        bound = scale.to(r.dtype).flatten(2).square().mean(2) * per_sample
        own_sq = torch.stack(own_steps).flatten(2).square().mean(2)
        return q, bound, own_sq * per_sample, own_sq * r[0, 0].numel()

    def __call__(self, a: Tensor) -> None:
        a = a.detach().to(self.dtype)
        if self.a_prev is None:
            self._start(a)
            return
        k = len(self.specs)
        diff = a - self.a_prev
        q, bound_noec, own_noec, printed_noec = self._round(diff.expand(k, *diff.shape), shared=True)
        delta_noec = diff - q
        r = a - self.a_hat
        q, bound_ec, own_ec, printed_ec = self._round(r, shared=False)
        delta_ec = r - q
        self.a_hat = self.a_hat + q
        if self.errors:
            self.acc = self.acc + delta_noec
        diff_sq = _sum_sq(diff, 1).expand(k, -1)
        err_noec, err_ec = self._errors(delta_ec, a.shape[0])
        self.rows.append(torch.stack([diff_sq, diff_sq, _sum_sq(delta_noec, 2), bound_noec, own_noec, printed_noec,
                                      err_noec, _sum_sq(r, 2), _sum_sq(delta_ec, 2), bound_ec, own_ec, printed_ec,
                                      err_ec]))
        self.a_prev = a

    def _errors(self, delta_ec: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """(||A E_k||^2, ||A delta_k||^2) per spec and sample, (K, B) each; NaN without errors."""
        k = len(self.specs)
        if not self.errors:
            nan = torch.full((k, batch), float("nan"), dtype=self.dtype, device=delta_ec.device)
            return nan, nan
        both = torch.stack([self.acc, delta_ec], dim=1).flatten(0, 2)  # (K * 2 * B, ...): spec, method, sample
        both = both.contiguous(memory_format=self.layout)
        out = self.op(both, with_bias=False).reshape(k, 2, batch, -1).square().sum(-1)
        return out[:, 0], out[:, 1]

    def result(self) -> np.ndarray:
        """(quantized steps, 1 + len(STAT_COLUMNS), K, B): diff_sq then the STAT_COLUMNS."""
        return torch.stack(self.rows).cpu().numpy()


def _categories(layers: Sequence[str], config: SweepConfig) -> dict[str, pd.CategoricalDtype]:
    """The categorical dtypes of the role, layer and quantizer columns (sorted values, as astype gives)."""
    return {"role": pd.CategoricalDtype(sorted(get_args(Role))), "layer": pd.CategoricalDtype(sorted(layers)),
            "quantizer": pd.CategoricalDtype(sorted(config.quantizers))}


def _codes(dtype: pd.CategoricalDtype, values: Sequence[str]) -> np.ndarray:
    return dtype.categories.get_indexer(list(values)).astype(np.int32)


def _long_frame(name: str, data: np.ndarray, role: Role, seeds: Sequence[int], config: SweepConfig,
                timesteps: Sequence[int], categories: Mapping[str, pd.CategoricalDtype]) -> pd.DataFrame:
    """data (n - 1, 1 + len(STAT_COLUMNS), K, B) -> rows (step, config, seed) of one layer."""
    steps, _, k, b = data.shape
    rows = steps * k * b
    step = np.repeat(np.arange(1, steps + 1), k * b)
    configs = config.configs

    def column(key: str, values: Sequence[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(np.resize(_codes(categories[key], values), rows), dtype=categories[key])

    frame = pd.DataFrame({
        "role": column("role", [role]), "layer": column("layer", [name]),
        "quantizer": column("quantizer", np.repeat([q for q, _ in configs], b)),
        "bits": np.tile(np.repeat([bb for _, bb in configs], b), steps).astype(np.int16),
        "seed": np.tile(np.asarray(seeds, dtype=np.int64), steps * k),
        "step": step.astype(np.int32), "paper_t": (steps + 1 - step).astype(np.int32),
        "t": np.asarray(timesteps, dtype=np.int64)[step],
        "diff_sq": data[:, 0].reshape(-1),
    })
    for c, column_name in enumerate(STAT_COLUMNS, start=1):
        frame[column_name] = data[:, c].reshape(-1)
    return frame


@torch.no_grad()
def _one_pass(runner: nn.Module, layers: Sequence[str], seeds: Sequence[int], role: Role, config: SweepConfig,
              timesteps: Sequence[int], device: torch.device,
              categories: Mapping[str, pd.CategoricalDtype]) -> list[pd.DataFrame]:
    specs = [quantizer_spec(q, b) for q, b in config.configs]
    dtype = getattr(torch, config.dtype)
    sims = {name: _LayerSimulator(linear_operator(runner.get_submodule(name)), specs, role == "held-out", dtype)
            for name in layers}
    with _pre_hooks(runner, sims), float32_precision("fp32"):
        md.sample_ddim(runner, md.noise(seeds, runner.sample_shape).to(device), timesteps)
    frames = []
    for name, sim in sims.items():
        if len(sim.rows) != len(timesteps) - 1:
            raise ValueError(f"layer {name!r} was called {len(sim.rows) + 1} times in {len(timesteps)} steps; "
                             "the sweep needs one call per model call (exclude layers called more than once)")
        frames.append(_long_frame(name, sim.result(), role, seeds, config, timesteps, categories))
    return frames


def _chunks(items: Sequence, size: int) -> list[list]:
    size = size or max(1, len(items))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def sweep_trajectories(model: nn.Module, layers: Sequence[str], calibration_seeds: Sequence[int],
                       heldout_seeds: Sequence[int], config: SweepConfig) -> pd.DataFrame:
    """One row per (role, layer, quantizer, bits, seed, quantized step i >= 1) with ``diff_sq`` and
    the `STAT_COLUMNS` (module docstring); ``err_sq_*`` are NaN on calibration rows. The fp model
    samples each role's seeds in batches of ``config.batch_size`` on ``config.device``, where the
    simulation runs too, in IEEE arithmetic (TF32 off on CUDA: its rounding would blur the errors measured)."""
    overlap = sorted(set(calibration_seeds) & set(heldout_seeds))
    if overlap or not calibration_seeds or not heldout_seeds:
        raise ValueError(f"calibration and held-out seeds must be non-empty and disjoint; shared: {overlap[:5]}")
    device = resolve_device(config.device)
    runner = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    timesteps = md.timesteps(config.steps, config.spacing or paper_spacing(model), model.schedule.num_timesteps)
    frames, categories = [], _categories(layers, config)
    for role, seeds in (("calibration", calibration_seeds), ("held-out", heldout_seeds)):
        for batch in _chunks(list(seeds), config.batch_size):
            for part in _chunks(list(layers), config.layers_per_pass):
                log.info("sweep: %s seeds %s..%s, %d layers", role, batch[0], batch[-1], len(part))
                frames += _one_pass(runner, part, batch, role, config, timesteps, device, categories)
    return pd.concat(frames, ignore_index=True)
