"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up.

Notation: W the full-precision weight, s and z its grid (per output channel, `weight_grid`), floor the
element-wise floor(W / s), V the learned rounding variables (one per weight), zeta = 1.1, gamma = -0.1.

    h(V)   = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)          rectified sigmoid, in [0, 1]
    W_soft = s (clamp(floor + h(V) + z, qmin, qmax) - z)             during optimisation
    W_hard = s (clamp(floor + [V >= 0] + z, qmin, qmax) - z)         afterwards: 0/1 per weight
    reg    = sum(1 - |2 h(V) - 1|^beta)                              pushes h to 0 or 1

V starts where h(V) equals the fractional part W / s - floor, so W_soft = W inside the grid's range.
The regulariser is off for the first ``warmup`` fraction of iterations (beta = ``beta_start`` there),
then beta decays linearly from ``beta_start`` to ``beta_end`` (BRECQ/Q-Diffusion's schedule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch
from torch import nn

from modiff.quant.primitives import QuantSpec, WeightMethod

__all__ = ["AdaRoundConfig", "AdaRoundWeight", "beta_at", "rectified_sigmoid", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Weight reconstruction settings; the defaults are the published Q-Diffusion/BRECQ values.

    ``iters`` per block (or lone layer), Adam on V with ``lr``; ``reg_weight`` weights the rounding
    regulariser; reconstruction loss sum over channels of |out_q - out_fp|^p, mean over the rest.
    ``init``/``init_p``: the grid's range search before rounding (Q-Diffusion: Lp search, p = 2.4).
    Speed only: ``cuda_graphs`` captures one optimisation step per block and replays it; ``autocast``
    runs the forward in bf16; ``storage_dtype`` holds cached block inputs/targets on the device.
    """

    iters: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    p: float = 2.0
    init: WeightMethod = "mse"
    init_p: float = 2.4
    seed: int = 0
    log_every: int = 1000
    cuda_graphs: bool = True
    autocast: bool = False
    storage_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"iters and batch_size must be >= 1, got {self.iters} and {self.batch_size}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the iterations in [0, 1), got {self.warmup}")
        if not self.beta_start >= self.beta_end > 0:
            raise ValueError(f"need beta_start >= beta_end > 0 (beta decays), got {self.beta_start} -> {self.beta_end}")
        if self.lr <= 0 or self.reg_weight < 0 or self.p <= 0 or self.log_every < 1:
            raise ValueError(f"need lr > 0, reg_weight >= 0, p > 0, log_every >= 1; got {self.lr}, "
                             f"{self.reg_weight}, {self.p}, {self.log_every}")
        if self.init not in get_args(WeightMethod):
            raise ValueError(f"init must be one of {get_args(WeightMethod)}, got {self.init!r}")
        if self.storage_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"storage_dtype must be float16, bfloat16 or float32, got {self.storage_dtype!r}")


def beta_at(iteration: int, config: AdaRoundConfig) -> tuple[float, float]:
    """(beta, regulariser weight) at ``iteration`` (0-based): weight 0 and beta_start during warm-up."""
    start = config.warmup * config.iters
    if iteration < start:
        return config.beta_start, 0.0
    progress = (iteration - start) / max(config.iters - start, 1.0)
    beta = config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - progress)
    return beta, config.reg_weight


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRoundWeight(nn.Module):
    """Soft-rounded weight of one layer; calling it gives W_soft and remembers h(V) for the regulariser."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        w = weight.detach().float()
        scaled = w * scale.reciprocal()  # W / s as fake_quantize computes it
        self.register_buffer("floor", torch.floor(scaled))
        self.register_buffer("scale", scale.float().expand_as(w).clone())
        self.register_buffer("zero_point", zero_point.float().expand_as(w).clone())
        self.register_buffer("nearest", torch.clamp(torch.round(scaled) + self.zero_point, spec.qmin, spec.qmax))
        rest = (scaled - self.floor).clamp(0.0, 1.0)
        # h(V) = rest  <=>  sigmoid(V) = (rest - gamma) / (zeta - gamma)  <=>  V = -log((zeta - gamma) / (rest - gamma) - 1)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))
        self.last_h: torch.Tensor | None = None

    def _dequantize(self, h: torch.Tensor) -> torch.Tensor:
        code = torch.clamp(self.floor + h + self.zero_point, self.spec.qmin, self.spec.qmax)
        return (code - self.zero_point) * self.scale

    def forward(self) -> torch.Tensor:
        self.last_h = rectified_sigmoid(self.v)
        return self._dequantize(self.last_h)

    def regulariser(self, beta: torch.Tensor) -> torch.Tensor:
        """sum(1 - |2 h - 1|^beta) over this layer's weights, from the h of the last forward."""
        if self.last_h is None:
            raise RuntimeError("call the AdaRoundWeight (the forward pass) before its regulariser")
        return (1.0 - (2.0 * self.last_h - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """Integer codes clamp(floor + [V >= 0] + z, qmin, qmax): the rounding decided, as floats."""
        up = (self.v >= 0).float()
        return torch.clamp(self.floor + up + self.zero_point, self.spec.qmin, self.spec.qmax)

    @torch.no_grad()
    def nearest_codes(self) -> torch.Tensor:
        """Round-to-nearest codes on the same grid, clamp(round(W / s) + z, qmin, qmax) (for comparison)."""
        return self.nearest.clone()

    def extra_repr(self) -> str:
        return f"{tuple(self.v.shape)}, bits={self.spec.bits}"
