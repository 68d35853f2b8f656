"""Error-propagation simulators for ONE linear layer on its recorded inputs (MoDiff paper, section 4).

Given the exact inputs a_t of one Conv/Linear layer at every sampling step and the layer's weights,
replay the layer under a quantizer and measure how the output error evolves. Everything runs in
float64 by default, so the only errors are the quantizer's.

Indexing. Inputs are given in SAMPLING ORDER: entry i (column ``step``, i = 0..n-1) is the i-th model
call. The paper counts steps down, t = T..1, with a_T the first (warm-up) input; here T = n and
paper step t = T - i (column ``paper_t``). The paper's difference a_t - a_{t+1} is a_i - a_{i-1}
(current call minus previous call).

=============  =====================================================================================
``A``          the layer's linear operator (bias separate); ``b`` its bias
``a_i``        exact input at sampling index i (all samples of the batch: one vector)
``o_i``        exact output A(a_i) + b
``Q``          activation quantizer: a `QuantSpec` (dynamic, qparams from the tensor it quantizes;
               bits 0 = skip, Q = 0), any callable Tensor -> Tensor, or None (exact)
``a_hat_i``    the input estimate implied by the method: o_hat_i = A(a_hat_i) + b at every step
``o_hat_i``    the method's output estimate
``r_i``        the tensor handed to Q at step i (column ``residual_sq`` = ||r_i||^2)
``c_i``        empirical relative rounding error ||r_i - Q(r_i)||^2 / ||r_i||^2 (NaN when r_i = 0)
``w``          warm-up steps (default 1; 0 for ``direct``, the PTQ baseline): a_hat_i = a_i and
               o_hat_i = o_i for i < w; the bias is added there, once
=============  =====================================================================================

Methods (`Method`):

- ``direct``:     o_hat_i = A(Q(a_i)) + b (r_i = a_i);
- ``modulated``:  standard modulation, no compensation: r_i = a_i - a_{i-1},
                  o_hat_i = o_hat_{i-1} + A(Q(r_i)) (past rounding errors add up: a random walk);
- ``modiff``:     error feedback: r_i = a_i - a_hat_{i-1}, a_hat_i = a_hat_{i-1} + Q(r_i),
                  o_hat_i = o_hat_{i-1} + A(Q(r_i)) (error = A(r_i - Q(r_i)), current residual only);
- ``cache`` / ``cache-noec``: like ``modiff`` / ``modulated`` but Q = 0 on steps with
                  i % N != 0 (N = ``cache_interval``); refresh steps use Q (or are exact if Q is None).
                  With compensation the skipped residual is carried into the next refresh.
These follow `modiff.quant.layers.direct.ModulatedLayer` step for step (its call counter is i).

Norms are Frobenius norms over the whole tensor of a step (batch included). The operator norm ||A||
is the spectral norm of the map on one sample (equal to that of the batched, block-diagonal map).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Literal, Optional, Sequence, Union, get_args

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modiff.quant.primitives import QuantSpec, quant_error_bound, quantize_dynamic, reduce_range

__all__ = [
    "Inputs",
    "Method",
    "Quantizer",
    "LinearOperator",
    "StepRecord",
    "as_quantizer",
    "error_frame",
    "explicit_matrix",
    "iter_simulation",
    "linear_operator",
    "operator_norm",
    "simulate",
    "theorem43_bound",
    "theorem43_own_range_bound",
]

Method = Literal["direct", "modulated", "modiff", "cache", "cache-noec"]
THM43_ULPS = 64  # float slack: Theorem 4.3 holds where error <= bound + 64 eps max(bound, error), eps the dtype's
Quantizer = Union[QuantSpec, Callable[[Tensor], Tensor], None]
Inputs = Union[Tensor, Sequence[Tensor]]


@dataclass(frozen=True)
class LinearOperator:
    """A layer as ``op(x, weight, bias)`` (F.linear or F.convNd with the layer's geometry)."""

    op: Callable[..., Tensor]
    weight: Tensor
    bias: Optional[Tensor]

    def __call__(self, x: Tensor, with_bias: bool = True) -> Tensor:
        return self.op(x, self.weight, self.bias if with_bias else None)

    def to(self, dtype: torch.dtype) -> "LinearOperator":
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return LinearOperator(self.op, self.weight.detach().to(dtype), bias)


def _op_of(layer: nn.Module) -> Callable[..., Tensor]:
    if isinstance(layer, nn.Linear):
        return F.linear
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.padding_mode != "zeros":
            raise TypeError(f"only zero-padded convolutions are linear here, got padding_mode={layer.padding_mode!r}")
        conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        return partial(conv, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    raise TypeError(f"expected nn.Linear, nn.Conv1d, nn.Conv2d or a modiff QuantLayer, got {type(layer).__name__}")


def linear_operator(
    layer: Union[nn.Module, LinearOperator], weight: Literal["quantized", "fp"] = "quantized"
) -> LinearOperator:
    """(op, weight, bias) of a Conv1d/Conv2d/Linear or a modiff QuantLayer.

    For a QuantLayer, ``weight="quantized"`` takes ``weight_q`` (what the layer computes with), so the
    simulated error is the activation quantizer's alone; ``"fp"`` takes the original weight.
    """
    if isinstance(layer, LinearOperator):
        return layer
    if weight not in ("quantized", "fp"):
        raise ValueError(f"weight must be 'quantized' or 'fp', got {weight!r}")
    if hasattr(layer, "weight_q") and callable(getattr(layer, "op", None)):
        w = layer.weight_q if weight == "quantized" else layer.weight
        return LinearOperator(layer.op, w.detach(), None if layer.bias is None else layer.bias.detach())
    return LinearOperator(_op_of(layer), layer.weight.detach(), None if layer.bias is None else layer.bias.detach())


def as_quantizer(quantizer: Quantizer) -> Callable[[Tensor], Tensor]:
    """Q as a function: dynamic `quantize_dynamic` for a QuantSpec, identity for None, else as given."""
    if quantizer is None:
        return lambda x: x
    if isinstance(quantizer, QuantSpec):
        return partial(quantize_dynamic, spec=quantizer)
    if callable(quantizer):
        return quantizer
    raise TypeError(
        f"quantizer must be a QuantSpec, a callable Tensor -> Tensor or None, got {type(quantizer).__name__}"
    )


def theorem43_bound(x: Tensor, spec: QuantSpec) -> float:
    """Theorem 4.3's bound on ||x - Q(x)||^2 for this quantizer's dynamic qparams of ``x``."""
    x_min, x_max = reduce_range(x, spec)
    return float(quant_error_bound(x_min, x_max, x.numel(), spec))


def theorem43_own_range_bound(x: Tensor, spec: QuantSpec) -> float:
    """Theorem 4.3 as the paper states it, in ``x``'s own range: s^2 d (floor) or s^2 d / 4 (nearest) summed over
    the qparam groups of ``spec``, s = (max - min) / (2^b - 1) of the group's values, d its size.

    The premise is a quantizer that maps [min, max] onto 2^b - 1 steps; this toolkit's quantizers widen an
    asymmetric range to contain 0 and the published one is symmetric (absmax over 2^(b-1) - 1 steps), so
    unlike `theorem43_bound` this bound can fail for them. The proof bounds each element's error, so the bound
    also applies to any part of a group, one sample of a per-tensor group for instance."""
    if spec.bits < 1:
        raise ValueError(f"Theorem 4.3 needs at least 1 bit, got bits={spec.bits}")
    x_min, x_max = reduce_range(x, spec)
    step = (x_max - x_min).to(torch.float64) / (2**spec.bits - 1)
    per_group = step.square() * (x.numel() / x_min.numel())
    return float(per_group.sum() / (4.0 if spec.rounding == "nearest" else 1.0))


# ---------------------------------------------------------------------------------------------------
# Operator norm
# ---------------------------------------------------------------------------------------------------


def _sample_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """(1, C, ...): one sample of a batched input shape (B, C, ...)."""
    return (1, *tuple(input_shape)[1:])


def explicit_matrix(operator: LinearOperator, input_shape: Sequence[int]) -> Tensor:
    """The matrix of A (bias excluded) on one sample of ``input_shape`` (for tiny layers and tests)."""
    shape = _sample_shape(input_shape)
    op = operator.to(torch.float64)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    return op(basis, with_bias=False).reshape(n, -1).T  # (out elements, in elements)


def _lanczos_top(matvec: Callable[[Tensor], Tensor], v: Tensor, iters: int, tol: float) -> float:
    """Largest eigenvalue of the symmetric PSD map ``matvec`` by Lanczos with full reorthogonalisation.

    The Krylov space span{v, Mv, M^2 v, ...} holds every power-iteration iterate, so its top Ritz value
    theta is at least the power-iteration estimate after as many products, and never above lambda_max.
    Stops when the Ritz pair's residual ||M y - theta y|| = beta_k |s_k| (an eigenvalue lies within it
    of theta) is below ``tol`` theta."""
    basis = torch.zeros(iters, v.numel(), dtype=v.dtype, device=v.device)  # (iters, n) orthonormal rows
    alphas: list[float] = []
    betas: list[float] = []
    q, theta = v.flatten() / v.norm(), 0.0
    for k in range(iters):
        basis[k] = q
        w = matvec(q.reshape(v.shape)).flatten()
        alphas.append(float(q @ w))
        for _ in range(2):  # twice is enough for orthogonality to working precision
            w = w - basis[: k + 1].T @ (basis[: k + 1] @ w)
        beta = float(w.norm())
        off = torch.tensor(betas, dtype=torch.float64)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tri)
        theta = float(values[-1])
        if beta * abs(float(vectors[-1, -1])) <= tol * max(theta, 0.0) or beta == 0.0:
            return theta
        betas.append(beta)
        q = w / beta
    return theta


def operator_norm(
    layer: Union[nn.Module, LinearOperator], input_shape: Optional[Sequence[int]] = None,
    iters: int = 300, tol: float = 1e-6, seed: int = 0,
) -> float:
    """Spectral norm ||A|| of the layer's linear map on ONE sample (bias excluded): the largest
    singular value of the matrix `explicit_matrix` would build, without building it.

    Linear (2-D weight): the largest singular value of W (exact, SVD); a Linear acting on tokens
    (B, N, C) is block diagonal in W, with the same norm. Convolutions: sqrt of the top eigenvalue of
    A^T A, for the actual per-sample input shape (``input_shape`` = (B, C, ...) of a recorded input;
    padding and stride make the norm shape dependent), found by power iteration accelerated with
    Lanczos (`_lanczos_top`: the same products A^T A v, fewer of them) from a seeded random start.
    A^T is the vector-Jacobian product of the linear map, i.e. the matching conv_transpose. The
    estimate approaches ||A|| from below; it stops when the Ritz residual is below ``tol`` relative
    (or after ``iters`` products): with the default 1e-6, ||A|| to about 1e-7 relative or better.
    """
    op = linear_operator(layer).to(torch.float64)
    if op.weight.ndim == 2:
        return float(torch.linalg.matrix_norm(op.weight, ord=2))
    if input_shape is None:
        raise ValueError("a convolution's operator norm depends on the input shape: pass input_shape=(B, C, ...)")
    shape = _sample_shape(input_shape)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(shape, generator=gen, dtype=torch.float64).to(op.weight.device)
    _, adjoint = torch.func.vjp(lambda x: op(x, with_bias=False), torch.zeros_like(v))
    top = _lanczos_top(lambda x: adjoint(op(x, with_bias=False))[0], v, iters, tol)
    return math.sqrt(max(top, 0.0))


# ---------------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One simulated step (tensors in the simulation dtype, batch shape of the layer)."""

    step: int
    exact: Tensor  # o_i = A(a_i) + b
    estimate: Tensor  # o_hat_i
    a_hat: Tensor  # implied input estimate: o_hat_i = A(a_hat_i) + b
    residual: Optional[Tensor]  # r_i handed to Q; None on warm-up steps
    quantized: Optional[Tensor]  # Q(r_i); zeros on skipped cache steps; None on warm-up steps
    refreshed: bool  # False on warm-up steps and skipped cache steps


def _check_method(method: str, cache_interval: int, warmup_steps: Optional[int]) -> int:
    """Validate the method's options; returns the number of warm-up steps (default 0 direct, else 1)."""
    if method not in get_args(Method):
        raise ValueError(f"method must be one of {get_args(Method)}, got {method!r}")
    if method.startswith("cache") and cache_interval < 1:
        raise ValueError(f"method {method!r} needs cache_interval >= 1, got {cache_interval}")
    if not method.startswith("cache") and cache_interval:
        raise ValueError(f"cache_interval only applies to the cache methods, got method {method!r}")
    if warmup_steps is None:
        return 0 if method == "direct" else 1
    if warmup_steps < (0 if method == "direct" else 1):
        raise ValueError(f"warmup_steps must be >= 1 for stateful methods (>= 0 for direct), got {warmup_steps}")
    return warmup_steps


def iter_simulation(
    inputs: Inputs, layer: Union[nn.Module, LinearOperator], quantizer: Quantizer, method: Method = "modiff",
    *, cache_interval: int = 0, warmup_steps: Optional[int] = None, dtype: torch.dtype = torch.float64,
) -> Iterator[StepRecord]:
    """Replay ``layer`` on ``inputs`` (sampling order) under ``method``, one `StepRecord` per step.

    Memory stays at a few tensors of one step: consume the records as they come (see `error_frame`).
    """
    warmup_steps = _check_method(method, cache_interval, warmup_steps)
    op, quant = linear_operator(layer).to(dtype), as_quantizer(quantizer)
    compensation = method in ("modiff", "cache")
    a_hat = a_ref = o_hat = None  # a_ref: what the next residual is taken against
    for i, a in enumerate(inputs):
        a = torch.as_tensor(a).detach().to(op.weight.device, dtype)
        exact = op(a)
        if i < warmup_steps:
            a_hat, a_ref, o_hat = a, a, exact
            yield StepRecord(i, exact, exact, a, None, None, False)
            continue
        if method == "direct":
            q = quant(a)
            yield StepRecord(i, exact, op(q), q, a, q, True)
            continue
        refresh = not method.startswith("cache") or i % cache_interval == 0
        r = a - a_ref
        q = quant(r) if refresh else torch.zeros_like(r)
        a_hat, o_hat = a_hat + q, o_hat + op(q, with_bias=False)
        a_ref = a_hat if compensation else a
        yield StepRecord(i, exact, o_hat, a_hat, r, q, refresh)


def simulate(
    inputs: Inputs, layer: Union[nn.Module, LinearOperator], quantizer: Quantizer, method: Method = "modiff",
    *, cache_interval: int = 0, warmup_steps: Optional[int] = None, dtype: torch.dtype = torch.float64,
) -> list[Tensor]:
    """The per-step output estimates o_hat_i of ``method`` (see `iter_simulation`)."""
    records = iter_simulation(inputs, layer, quantizer, method, cache_interval=cache_interval,
                              warmup_steps=warmup_steps, dtype=dtype)
    return [rec.estimate for rec in records]


def _step_row(rec: StepRecord, spec: Optional[QuantSpec]) -> dict[str, float]:
    err_sq = float((rec.exact - rec.estimate).square().sum())
    out_norm = float(rec.exact.norm())
    row = {"step": rec.step, "refreshed": rec.refreshed, "warmup": rec.residual is None,
           "err": math.sqrt(err_sq), "err_sq": err_sq,
           "rel_err": math.sqrt(err_sq) / out_norm if out_norm > 0 else math.nan}
    nan = math.nan
    row.update(residual_sq=nan, rounding_sq=nan, c_t=nan, thm43_bound=nan, thm43_margin=nan)
    if rec.residual is not None:
        residual_sq = float(rec.residual.square().sum())
        rounding_sq = float((rec.residual - rec.quantized).square().sum())
        row.update(residual_sq=residual_sq, rounding_sq=rounding_sq,
                   c_t=rounding_sq / residual_sq if residual_sq > 0 else nan)
        if spec is not None and rec.refreshed:
            bound = theorem43_bound(rec.residual, spec)
            row.update(thm43_bound=bound, thm43_margin=bound - rounding_sq)
    row["thm43_holds"] = None
    if not math.isnan(row["thm43_margin"]):
        slack = THM43_ULPS * torch.finfo(rec.residual.dtype).eps * max(row["thm43_bound"], row["rounding_sq"])
        row["thm43_holds"] = bool(row["thm43_margin"] >= -slack)
    return row


def error_frame(
    inputs: Inputs, layer: Union[nn.Module, LinearOperator], quantizer: Quantizer, method: Method = "modiff",
    *, cache_interval: int = 0, warmup_steps: Optional[int] = None, timesteps: Optional[Sequence[int]] = None,
    dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """One row per step: step, paper_t, t, method, refreshed, warmup, err = ||o_i - o_hat_i||, err_sq,
    rel_err = err / ||o_i||, residual_sq, rounding_sq = ||r_i - Q(r_i)||^2, c_t, and Theorem 4.3's
    thm43_bound / thm43_margin (bound - rounding_sq) / thm43_holds (QuantSpec quantizers, quantized steps).
    """
    spec = quantizer if isinstance(quantizer, QuantSpec) else None
    records = iter_simulation(inputs, layer, quantizer, method, cache_interval=cache_interval,
                              warmup_steps=warmup_steps, dtype=dtype)
    frame = pd.DataFrame([_step_row(rec, spec) for rec in records])
    n = len(frame)
    if timesteps is not None and len(timesteps) < n:
        raise ValueError(f"timesteps has {len(timesteps)} entries for {n} steps")
    frame.insert(1, "paper_t", n - frame["step"])
    frame.insert(2, "t", np.nan if timesteps is None else np.asarray(timesteps[:n], dtype=float))
    frame.insert(3, "method", method)
    return frame
