"""MoDiff's per-sample dynamic modulation step as two Triton kernels (`modiff.quant.kernels`).

a_hat_next = a_hat + Q(a_t - a_ref), Q per sample (and per half with a split shortcut), equal to
`modiff.quant.modules._modulate` with `quantize_dynamic` (bit for bit in the Triton interpreter; on CUDA
torch divides by a scalar through its reciprocal and the kernel may fuse the final multiply-add, so a
value on a rounding boundary can land one step away). Torch code of the same step leaves the range
reduction to inductor, which gives each sample one program when the batch has more samples than twice the
GPU's multiprocessors (512 programs looping over up to 393 k values at batch 512: 0.2-1.6 TB/s on an H200).
Here the ranges are reduced over chunks of every sample in parallel, and the update reads the tensors once more.

Registered as a `torch.library.triton_op`, so a compiled network launches the kernels from its own graph.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from modiff.quant.primitives import QuantSpec

__all__ = ["fused_modulate_pays_off", "fused_modulate_supported", "modulate_per_sample", "register_op"]

_BLOCK = 1024  # values per loop iteration of a program
_MIN_CHUNK = 4096  # values of one sample per program
_MAX_CHUNKS = 256  # chunks per sample at most: the update kernel reduces a sample's chunk ranges in one block
_SAMPLES_PER_MULTIPROCESSOR = 2  # above this batch per multiprocessor inductor reduces one sample per program
_TRITON = importlib.util.find_spec("triton") is not None  # a constant: compiled graphs read it without tracing a call


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _sample_major_dense(x: Tensor) -> bool:
    """Contiguous, or channels_last: one sample's values are one dense run of memory."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def fused_modulate_supported(x: Tensor, a_hat: Tensor, a_ref: Tensor, spec: Optional[QuantSpec]) -> bool:
    """Whether `modulate_per_sample` applies: CUDA with Triton (or the Triton interpreter), per-sample dynamic
    ranges with bits >= 2, and x, a_hat, a_ref of one shape and one sample-major dense layout."""
    on_device = _TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    return (spec is not None and spec.granularity == "sample" and spec.bits >= 2 and on_device and x.ndim >= 2
            and x.shape == a_hat.shape == a_ref.shape and x.stride() == a_hat.stride() == a_ref.stride()
            and x.numel() > 0 and _sample_major_dense(x))


def fused_modulate_pays_off(x: Tensor) -> bool:
    """Whether the kernels beat the torch step compiled by inductor: only for batches of more samples than
    twice the GPU's multiprocessors. Below that inductor splits each sample's range reduction well, and the
    kernels' two launches per layer cost host time (H200, batch 64 in one process: 36.0 vs 41.4 images/s
    with the torch step; batch 512 in separate runs: 128.9 vs 124.0)."""
    return x.is_cuda and x.shape[0] > _SAMPLES_PER_MULTIPROCESSOR * torch.cuda.get_device_properties(
        x.device).multi_processor_count


def _modulate(x: Tensor, a_hat: Tensor, a_ref: Tensor, bits: int, scheme: str, floor: bool, qmin: int, qmax: int,
              split: int, same_ref: bool) -> Tensor:
    from modiff.quant import kernels  # imported on first use: TRITON_INTERPRET is read when it is

    samples = x.shape[0]
    n = x.numel() // samples
    chunk = max(_MIN_CHUNK, -(-n // _MAX_CHUNKS))
    chunks = -(-n // chunk)
    partials = torch.empty((samples, chunks, 2, 3), dtype=torch.float32, device=x.device)
    out = torch.empty_like(a_hat)
    channels, stride_c = x.shape[1], x.stride(1)
    has_split = split > 0
    torch.library.wrap_triton(kernels.ranges_kernel)[(samples, chunks)](
        x, a_ref, partials, n, chunks, chunk, channels, stride_c, split, HAS_SPLIT=has_split, BLOCK=_BLOCK)
    asymmetric = scheme == "asymmetric"
    levels = 2**bits - 1 if asymmetric else 2 ** (bits - 1) - 1
    torch.library.wrap_triton(kernels.update_kernel)[(samples, chunks)](
        x, a_ref, a_hat, partials, out, n, chunks, chunk, channels, stride_c, split, HAS_SPLIT=has_split,
        LEVELS=levels, ASYMMETRIC=asymmetric, QMIN=qmin, QMAX=qmax, FLOOR=floor, SAME_REF=same_ref,
        GP=_pow2(chunks), BLOCK=_BLOCK)
    return out


_OP: Optional[Callable[..., Tensor]] = None  # `_modulate` as a triton_op, registered by `register_op`


def register_op() -> None:
    """Register the triton_op (once; a no-op without Triton). Registering imports Triton and torch._inductor
    (1.4 s), so `trajectory()` calls it on entry instead of modiff doing it on import; a compiled graph then
    only reads `_OP`."""
    global _OP
    if _OP is None and _TRITON:
        _OP = torch.library.triton_op("modiff::modulate_per_sample", _modulate, mutates_args=())


def modulate_per_sample(x: Tensor, a_hat: Tensor, a_ref: Tensor, spec: QuantSpec, split: Optional[int]) -> Tensor:
    """a_hat + Q(x - a_ref) in a_hat's dtype, Q dynamic per sample (per channel half with `split`)."""
    if not fused_modulate_supported(x, a_hat, a_ref, spec):
        raise ValueError("modulate_per_sample needs per-sample dynamic quantization (bits >= 2) of CUDA tensors "
                         "of one shape and one contiguous or channels_last layout (see fused_modulate_supported)")
    if split is not None and not 0 < split < x.shape[1]:
        raise ValueError(f"split must be in (0, {x.shape[1]}) channels, got {split}")
    register_op()
    return _OP(x, a_hat, a_ref, spec.bits, spec.scheme, spec.rounding == "floor", spec.qmin, spec.qmax, split or 0,
               a_ref is a_hat)  # error compensation: a_ref is a_hat, read once
