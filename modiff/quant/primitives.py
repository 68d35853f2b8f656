"""Uniform affine quantization: specs, quantization parameters, fake quantization, error bounds.

Pure tensor functions with no module state. Every function works on any device and never reads a
tensor value back to the host, so the dynamic path (`quantize_dynamic`) can run inside compiled or
captured graphs.

Notation (paper symbols where they exist):

=============  ===========================================================================
``x``          input tensor, shape (B, C, ...) for activations, (out, in, ...) for weights
``b``          bit width (``QuantSpec.bits``); b = 0 means "skip": Q(x) = 0 (caching)
``s``          scale (step size), > 0, keepdim shape that broadcasts against ``x``
``z``          zero point, a float tensor holding integers, same shape as ``s``
``q``          integer code, clamp(round(x / s) + z, qmin, qmax)
``qmin/qmax``  ends of the integer grid (see `QuantSpec.qmin`)
``Q(x)``       fake-quantized value s (q - z), same shape and dtype as ``x``
``d``          number of elements covered by one (s, z) pair
``p``          exponent of the Lp clipping-search loss, sum |x - Q(x)|^p
=============  ===========================================================================

Schemes: ``asymmetric`` s = (max - min) / (2^b - 1), z = round(-min / s), grid [0, 2^b - 1], with the
range first widened to contain 0 (as PyTorch observers do, so Q(0) = 0 exactly; the published code widens it
for the per-tensor zero point only and not for per-channel or per-sample ranges, the same wherever the range
holds 0, as weight rows, residuals and post-SiLU inputs do);
``symmetric`` s = absmax / (2^(b-1) - 1), z = 0, restricted grid [-(2^(b-1) - 1), 2^(b-1) - 1];
``symmetric-published`` the same scale with the full grid [-2^(b-1), 2^(b-1) - 1] (MoDiff/Q-Diffusion).

Rounding ``nearest`` is round-half-to-even (`torch.round`), the tie rule of
`torch.fake_quantize_per_tensor_affine` (C ``nearbyint``); like that kernel, x / s is computed as
x * (1 / s), so results agree with PyTorch bit for bit.

Bit widths as data (``Grid``): `quant_grid(spec)` gives (levels, qmin, qmax) as 0-dim float32 tensors, with
levels = 2^b - 1 (asymmetric) or 2^(b-1) - 1 (symmetric). Passed as ``grid=``, they replace the bit width
read from ``spec``, so a compiled network that holds them as buffers reads bit widths as data and serves
every bit width with one graph (`modiff.quant.layers`). The values are the same (the division by the levels
is an IEEE division on every device); 0 bits is the grid (1, 0, 0): Q(x) = 0 for finite x.

Granularities (which elements share one (s, z)): ``tensor`` one pair for the whole tensor (batch
dependent: the published default); ``sample`` one per index of dim 0; ``channel`` one per index of
``channel_axis``; ``token`` one per position of every dim but ``channel_axis`` (per sample and pixel
for (B, C, H, W), per token for (B, N, C) with channel_axis=-1); ``group`` one per index of dim 0 and per
block of ``group_size`` consecutive indices of ``channel_axis``. Group qparams are returned repeated
over the channels of their group, shape (B, C, 1, ...), so they broadcast against ``x`` like the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, get_args

import torch
from torch import Tensor

__all__ = [
    "MIN_SCALE",
    "Granularity",
    "Grid",
    "QuantSpec",
    "Rounding",
    "Scheme",
    "WeightMethod",
    "fake_quantize",
    "floor_ste",
    "group_view",
    "lp_search_qparams",
    "qparams_from_range",
    "quant_error_bound",
    "quant_grid",
    "quantize_dynamic",
    "reduce_dims",
    "reduce_range",
    "round_ste",
    "weight_qparams",
]

Scheme = Literal["asymmetric", "symmetric", "symmetric-published"]
Rounding = Literal["nearest", "floor"]
Granularity = Literal["tensor", "sample", "channel", "token", "group"]
WeightMethod = Literal["minmax", "mse"]

MIN_SCALE: float = 1e-12
"""Smallest scale: a constant or all-zero range gives s = MIN_SCALE, finite output, and Q(0) = 0."""


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, grid, rounding and which elements share a scale.

    ``bits`` 0 means skip (Q(x) = 0), otherwise 2..16. ``group_size`` (channels per group) must be > 0
    exactly when ``granularity == "group"``. ``channel_axis`` is 1 for activations (B, C, ...), 0 for
    weights (out, in, ...) and -1 for token-major activations (B, N, C). ``samples_per_scale`` (granularity
    ``tensor`` only): 0 shares one scale over the whole batch tensor; g > 0 over each run of g consecutive
    samples (the last run of a batch may be shorter), so that a batch of k * g samples quantizes as k
    batches of g: the published code's per-tensor scales at its own batch size, whatever batch runs here.
    """

    bits: int = 8
    scheme: Scheme = "asymmetric"
    rounding: Rounding = "nearest"
    granularity: Granularity = "tensor"
    group_size: int = 0
    channel_axis: int = 1
    samples_per_scale: int = 0

    def __post_init__(self) -> None:
        for name in ("bits", "group_size", "channel_axis", "samples_per_scale"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"QuantSpec.{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.bits != 0 and not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be 0 (skip: Q(x) = 0) or in [2, 16], got {self.bits}")
        _check_choice("scheme", self.scheme, Scheme)
        _check_choice("rounding", self.rounding, Rounding)
        _check_choice("granularity", self.granularity, Granularity)
        if self.granularity == "group" and self.group_size <= 0:
            raise ValueError(f"granularity 'group' needs group_size > 0 (channels per group), got {self.group_size}")
        if self.granularity != "group" and self.group_size != 0:
            raise ValueError(
                f"group_size={self.group_size} is only used with granularity 'group', got granularity "
                f"{self.granularity!r}; set group_size=0 or granularity='group'"
            )
        if self.samples_per_scale < 0 or (self.samples_per_scale and self.granularity != "tensor"):
            raise ValueError(f"samples_per_scale={self.samples_per_scale} needs granularity 'tensor' and a value >= 0 "
                             f"(0: one scale for the whole batch tensor), got granularity {self.granularity!r}")

    @property
    def qmin(self) -> int:
        """Lowest integer code: 0 (asymmetric), -(2^(b-1) - 1) (symmetric), -2^(b-1) (published)."""
        if self.bits == 0 or self.scheme == "asymmetric":
            return 0
        half = 2 ** (self.bits - 1)
        return -half if self.scheme == "symmetric-published" else -(half - 1)

    @property
    def qmax(self) -> int:
        """Highest integer code: 2^b - 1 (asymmetric), 2^(b-1) - 1 (both symmetric schemes); 0 if b = 0."""
        if self.bits == 0:
            return 0
        return 2**self.bits - 1 if self.scheme == "asymmetric" else 2 ** (self.bits - 1) - 1


class Grid(NamedTuple):
    """The integer grid of a spec as 0-dim float32 tensors (see "Bit widths as data" above)."""

    levels: Tensor  # steps between the ends of the range: 2^b - 1 (asymmetric), 2^(b-1) - 1 (symmetric)
    qmin: Tensor
    qmax: Tensor


def quant_grid(spec: QuantSpec) -> Grid:
    """``spec``'s (levels, qmin, qmax) as 0-dim float32 CPU tensors; 0 bits gives (1, 0, 0)."""
    if spec.bits == 0:
        levels = 1
    else:
        levels = 2**spec.bits - 1 if spec.scheme == "asymmetric" else 2 ** (spec.bits - 1) - 1
    return Grid(*(torch.tensor(float(v)) for v in (levels, spec.qmin, spec.qmax)))


def _check_choice(name: str, value: object, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"QuantSpec.{name} must be one of {allowed}, got {value!r}")


# ---------------------------------------------------------------------------------------------------
# Which elements share one (s, z)
# ---------------------------------------------------------------------------------------------------


def _channel_axis(x: Tensor, spec: QuantSpec) -> int:
    axis = spec.channel_axis
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"channel_axis={axis} is out of range for a {x.ndim}-D tensor of shape {tuple(x.shape)}"
        )
    return axis % x.ndim


def _needs_dims(x: Tensor, spec: QuantSpec) -> None:
    if spec.granularity != "tensor" and x.ndim == 0:
        raise ValueError(f"granularity {spec.granularity!r} needs a tensor with at least one dim, got a scalar")


def group_view(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``x`` with its channel axis split into (C / group_size, group_size); ndim grows by one."""
    axis = _channel_axis(x, spec)
    channels = x.shape[axis]
    if channels % spec.group_size != 0:
        raise ValueError(
            f"{channels} channels (axis {axis} of shape {tuple(x.shape)}) are not divisible by "
            f"group_size={spec.group_size}; choose a group_size that divides {channels}"
        )
    shape = x.shape[:axis] + (channels // spec.group_size, spec.group_size) + x.shape[axis + 1 :]
    return x.reshape(shape)


def reduce_dims(x: Tensor, spec: QuantSpec) -> tuple[int, ...]:
    """Dims reduced to get one (s, z) per group of elements, for ``spec.granularity``.

    For ``group`` the dims refer to ``group_view(x, spec)`` (one more dim than ``x``): everything but
    dim 0 and the group index. Use `reduce_range` to get ranges shaped to broadcast against ``x``.
    """
    _needs_dims(x, spec)
    dims = range(x.ndim)
    if spec.granularity == "tensor":
        return tuple(dims)
    if spec.granularity == "sample":
        return tuple(dims)[1:]
    axis = _channel_axis(x, spec)
    if spec.granularity == "channel":
        return tuple(d for d in dims if d != axis)
    if spec.granularity == "token":
        return (axis,)
    # group: in the grouped view the channel axis becomes (group index at `axis`, member at `axis + 1`)
    return tuple(d for d in range(x.ndim + 1) if d not in (0, axis))


def _reduce(x: Tensor, spec: QuantSpec, op: Callable[..., Tensor]) -> Tensor:
    """``op(x, dim=..., keepdim=True)`` over the qparam groups, shaped to broadcast against ``x``."""
    if spec.samples_per_scale:
        return _reduce_sample_runs(x, spec.samples_per_scale, op)
    dims = reduce_dims(x, spec)
    if spec.granularity != "group":
        return op(x, dim=dims, keepdim=True)
    axis = _channel_axis(x, spec)
    grouped = op(group_view(x, spec), dim=dims, keepdim=True)  # (.., C/g, 1, ..)
    shape = list(grouped.shape)
    shape[axis + 1] = spec.group_size
    out_shape = shape[:axis] + [x.shape[axis]] + shape[axis + 2 :]
    return grouped.expand(shape).reshape(out_shape)  # (.., C, ..): each group's value repeated g times


def _reduce_sample_runs(x: Tensor, per_scale: int, op: Callable[..., Tensor]) -> Tensor:
    """``op`` over each run of ``per_scale`` consecutive samples (the last may be shorter), shaped (B, 1, ..):
    every sample carries its run's value. ``op`` is amin, amax or sum: an op of per-sample ops."""
    batch = x.shape[0]
    per_sample = op(x.reshape(batch, -1), dim=1)
    whole = batch - batch % per_scale
    runs = [op(per_sample[:whole].reshape(-1, per_scale), dim=1).repeat_interleave(per_scale)] if whole else []
    if whole < batch:
        runs.append(op(per_sample[whole:], dim=0, keepdim=True).expand(batch - whole))
    return torch.cat(runs).reshape(batch, *([1] * (x.ndim - 1)))


def reduce_range(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-group (min, max) of ``x``, keepdim shapes that broadcast against ``x``; no host sync."""
    return _reduce(x, spec, torch.amin), _reduce(x, spec, torch.amax)


# ---------------------------------------------------------------------------------------------------
# Quantization parameters and fake quantization
# ---------------------------------------------------------------------------------------------------


def _param_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def qparams_from_range(x_min: Tensor, x_max: Tensor, spec: QuantSpec,
                       grid: Optional[Grid] = None) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) for ranges [x_min, x_max] (same shapes), as float32/float64 tensors.

    Asymmetric ranges are widened to contain 0; scales are clamped below by `MIN_SCALE`. For
    ``bits == 0`` the result is a placeholder (s = 1, z = 0): Q(x) = 0 whatever the parameters. ``grid``
    (`quant_grid`) replaces the bit width of ``spec``.
    """
    dtype = _param_dtype(x_min)
    x_min, x_max = x_min.to(dtype), x_max.to(dtype)
    if grid is None:
        if spec.bits == 0:
            return torch.ones_like(x_min), torch.zeros_like(x_min)
        asymmetric = spec.scheme == "asymmetric"
        levels: Tensor | int = 2**spec.bits - 1 if asymmetric else 2 ** (spec.bits - 1) - 1
        qmin: Tensor | int = spec.qmin
        qmax: Tensor | int = spec.qmax
    else:
        levels, qmin, qmax = grid
    if spec.scheme == "asymmetric":
        x_min = torch.clamp(x_min, max=0.0)
        x_max = torch.clamp(x_max, min=0.0)
        scale = torch.clamp((x_max - x_min) / levels, min=MIN_SCALE)
        zero_point = torch.clamp(torch.round(-x_min / scale), qmin, qmax)
        return scale, zero_point
    absmax = torch.maximum(x_min.abs(), x_max.abs())
    scale = torch.clamp(absmax / levels, min=MIN_SCALE)
    return scale, torch.zeros_like(scale)


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: Tensor) -> Tensor:
    """Floor in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x) - x).detach()


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec,
                  grid: Optional[Grid] = None) -> Tensor:
    """Q(x) = s (clamp(round(x / s) + z, qmin, qmax) - z), same shape and dtype as ``x``.

    ``scale`` and ``zero_point`` broadcast against ``x``. Gradients: straight-through for ``x`` (1 where
    the code is inside [qmin, qmax], 0 where clamped); LSQ for ``scale`` (round(x/s) - x/s inside,
    qmin - z or qmax - z outside), without LSQ's 1/sqrt(N qmax) gradient scaling (apply it to ``scale``
    before the call if wanted). ``bits == 0`` gives zeros. ``grid`` (`quant_grid`) replaces the bit
    width of ``spec``.
    """
    if grid is None:
        if spec.bits == 0:
            return torch.zeros_like(x)
        qmin: Tensor | int = spec.qmin
        qmax: Tensor | int = spec.qmax
    else:
        _, qmin, qmax = grid
    compute = x.to(torch.promote_types(x.dtype, scale.dtype))  # at least float32 for the grid math
    scaled = compute * scale.reciprocal()  # x / s as PyTorch's kernels compute it: bit-exact agreement
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        code = round_ste(scaled) if spec.rounding == "nearest" else floor_ste(scaled)
        code = _clamp_ste(code + zero_point, qmin, qmax)
    else:  # the same values with fewer kernels
        code = torch.round(scaled) if spec.rounding == "nearest" else torch.floor(scaled)
        code = torch.clamp(code + zero_point, qmin, qmax)
    return ((code - zero_point) * scale).to(x.dtype)


def _clamp_ste(code: Tensor, qmin: Tensor | int, qmax: Tensor | int) -> Tensor:
    """clamp(code, qmin, qmax); gradient 1 on [qmin, qmax] (ends included, as PyTorch's fake-quant
    mask), 0 outside. torch.clamp's own gradient is 0 at the ends, which would drop the gradient of
    codes that round exactly to qmin or qmax."""
    fixed = code.detach()
    inside = (fixed >= qmin) & (fixed <= qmax)
    return torch.where(inside, code, torch.clamp(fixed, qmin, qmax))


def quantize_dynamic(x: Tensor, spec: QuantSpec, grid: Optional[Grid] = None) -> Tensor:
    """Fake-quantize ``x`` with qparams from its own per-group min/max (no host sync).

    With ``tensor`` granularity the result for one sample depends on the rest of the batch, as in the
    published code; ``sample`` granularity removes that dependence. The range is not differentiated.
    ``grid`` (`quant_grid`) replaces the bit width of ``spec``.
    """
    if grid is None and spec.bits == 0:
        return torch.zeros_like(x)
    x_min, x_max = reduce_range(x.detach(), spec)
    scale, zero_point = qparams_from_range(x_min, x_max, spec, grid)
    return fake_quantize(x, scale, zero_point, spec, grid)


def quant_error_bound(x_min: Tensor, x_max: Tensor, numel: int, spec: QuantSpec) -> Tensor:
    """Theorem 4.3: bound on ||x - Q(x)||^2 for an ``x`` of ``numel`` elements with these group ranges.

    Sum over qparam groups of s^2 d (floor) or s^2 d / 4 (nearest), d = numel / x_min.numel() elements
    per entry of ``x_min``, s the scale this quantizer uses (asymmetric: from the range widened to 0).
    For ``bits == 0`` (Q(x) = 0) the bound is sum of absmax^2 d. Returns a 0-dim tensor.
    """
    d = numel / x_min.numel()
    if spec.bits == 0:
        absmax = torch.maximum(x_min.abs(), x_max.abs()).to(_param_dtype(x_min))
        return (absmax.square() * d).sum()
    scale, _ = qparams_from_range(x_min, x_max, spec)
    per_entry = scale.square() * d
    return per_entry.sum() / (4.0 if spec.rounding == "nearest" else 1.0)


# ---------------------------------------------------------------------------------------------------
# Clipping search (Lp / MSE) and weight qparams
# ---------------------------------------------------------------------------------------------------


def lp_search_qparams(
    x: Tensor, x_min: Tensor, x_max: Tensor, spec: QuantSpec, grid: int = 100, p: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Per group, the clipped range (1 - i/grid) [x_min, x_max], i in 0..0.8 grid - 1, of least Lp error.

    The search of Q-Diffusion (grid 100 gives factors 1.00, 0.99, ..., 0.21): ``x`` is the data, x_min
    and x_max its keepdim group ranges for ``spec`` (as from `reduce_range`). Error per candidate:
    sum |x - Q(x)|^p over each group. Vectorised over groups, one pass over ``x`` per candidate.
    """
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    if spec.bits == 0:
        return qparams_from_range(x_min, x_max, spec)
    scales, zero_points, errors = [], [], []
    for i in range(max(1, int(0.8 * grid))):
        factor = 1.0 - i / grid
        scale, zero_point = qparams_from_range(x_min * factor, x_max * factor, spec)
        err = (x - fake_quantize(x, scale, zero_point, spec)).abs().pow(p)
        scales.append(scale)
        zero_points.append(zero_point)
        errors.append(_reduce(err.to(scale.dtype), spec, torch.sum))  # (*keepdim), like x_min
    best = torch.stack(errors).argmin(dim=0, keepdim=True)  # (1, *keepdim): first best candidate
    scale = torch.stack(scales).gather(0, best).squeeze(0)
    return scale, torch.stack(zero_points).gather(0, best).squeeze(0)


def weight_qparams(
    weight: Tensor,
    spec: QuantSpec,
    method: WeightMethod = "minmax",
    grid: int = 100,
    p: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of a weight for ``spec`` (usually channel granularity, channel_axis=0).

    ``minmax`` uses the full per-group range; ``mse`` searches the clipping ratio of least
    ||W - Q(W)||_p^p per group (`lp_search_qparams`). Shapes broadcast against ``weight``.
    """
    if method not in get_args(WeightMethod):
        raise ValueError(f"method must be one of {get_args(WeightMethod)}, got {method!r}")
    w = weight.detach()
    w_min, w_max = reduce_range(w, spec)
    if method == "minmax":
        return qparams_from_range(w_min, w_max, spec)
    return lp_search_qparams(w, w_min, w_max, spec, grid=grid, p=p)
