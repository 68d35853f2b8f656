"""MoDiff's per-sample dynamic modulation step as two Triton kernels (`modiff.quant.kernels.modulate_triton`).

a_hat_next = a_hat + Q(a_t - a_ref), Q per sample (and per half with a split shortcut), equal to
`modiff.quant.layers.modulated._modulate` with `quantize_dynamic` (bit for bit in the Triton interpreter; on CUDA
torch divides by a scalar through its reciprocal and the kernel may fuse the final multiply-add, so a
value on a rounding boundary can land one step away). Torch code of the same step leaves the range
reduction to inductor, which often gives each sample one program, a slow reduction over a whole sample
(profiles and numbers: benchmarks/README.md, "The modulation step as two Triton kernels").
Here the ranges are reduced over chunks of every sample in parallel, and the update reads the tensors once more
and writes a_hat in place (its address stays fixed, so a CUDA graph can replay the step). `one_pass_modulation`
switches to one launch whose programs meet at a per-sample barrier between the two, so that the second read
can come from L2 (the kernel's docstring says why); not yet timed on a GPU, so not the default.

Registered as a `torch.library.triton_op`, so a compiled network launches the kernels from its own graph.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from modiff.quant.kernels import source_digest
from modiff.quant.primitives import Grid, QuantSpec, quant_grid

__all__ = ["use_fused_modulate", "fused_spec_supported", "fused_tensors_supported", "fused_modulate_supported",
           "modulate_per_sample", "launch_modulate", "register_op", "one_pass_modulation", "one_pass_chunks"]

_BLOCK = 1024  # values per loop iteration of a program
_MIN_CHUNK = 4096  # values of one sample per program
_MAX_CHUNKS = 256  # chunks per sample at most: the update kernel reduces a sample's chunk ranges in one block
_KERNELS = True  # False: the torch step on CUDA too (benchmarks and tests compare the two)
_ONE_PASS = False  # True: `one_pass_kernel` instead of the two kernels (`one_pass_modulation`)
_TRITON = importlib.util.find_spec("triton") is not None  # a constant: compiled graphs read it without tracing a call


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _sample_major_dense(x: Tensor) -> bool:
    """Contiguous, or channels_last: one sample's values are one dense run of memory."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def fused_spec_supported(spec: Optional[QuantSpec]) -> bool:
    """The quantizer part of `fused_modulate_supported`: per-sample dynamic ranges with bits >= 2. Layers
    ask it once, when they are built: a compiled network then never reads the bit width."""
    return spec is not None and spec.granularity == "sample" and spec.bits >= 2


def fused_tensors_supported(x: Tensor, a_hat: Tensor, a_ref: Optional[Tensor]) -> bool:
    """The tensor part of `fused_modulate_supported`: CUDA with Triton (or the Triton interpreter), and x,
    a_hat, a_ref (None: a_hat) of one shape and one sample-major dense layout."""
    on_device = _TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    a_ref = a_hat if a_ref is None else a_ref
    return (on_device and x.ndim >= 2 and x.shape == a_hat.shape == a_ref.shape
            and x.stride() == a_hat.stride() == a_ref.stride() and x.numel() > 0 and _sample_major_dense(x))


def fused_modulate_supported(x: Tensor, a_hat: Tensor, a_ref: Optional[Tensor], spec: Optional[QuantSpec]) -> bool:
    """Whether `modulate_per_sample` applies: CUDA with Triton (or the Triton interpreter), per-sample dynamic
    ranges with bits >= 2, and x, a_hat, a_ref (None: a_hat) of one shape and one sample-major dense layout."""
    return fused_spec_supported(spec) and fused_tensors_supported(x, a_hat, a_ref)


def use_fused_modulate(x: Tensor) -> bool:
    """Whether the layers take the kernels: on CUDA, where they beat the torch step compiled by inductor
    except in a host-bound run (small batch without CUDA graphs), where their two launches per layer cost
    host time (benchmarks/README.md, "Quantized sampling", has the measurements)."""
    return _KERNELS and x.is_cuda


def one_pass_chunks(n: int, max_chunks: int) -> tuple[int, int]:
    """(values per chunk, chunks per sample) of `one_pass_kernel` for samples of n values: the two kernels' chunking,
    with at most ``max_chunks`` chunks. Its barrier waits until all of a sample's programs have arrived, so they
    must fit on the device at once: the launcher allows 2 per SM, which always fit (a program of 4 warps takes at
    most 32,640 of an SM's 65,536 registers, at 255 per thread)."""
    chunk = max(_MIN_CHUNK, -(-n // min(_MAX_CHUNKS, max_chunks)))
    return chunk, -(-n // chunk)


def _modulate(x: Tensor, a_hat: Tensor, a_ref: Optional[Tensor], levels: Tensor, qmin: Tensor, qmax: Tensor,
              scheme: str, floor: bool, split: int, one_pass: bool, source: str) -> None:
    # ``source``: read by no kernel; an argument so that the compile caches see the code (`source_digest`)
    from modiff.quant.kernels import modulate_triton as kernels  # imported on first use: TRITON_INTERPRET is read when it is

    samples = x.shape[0]
    n = x.numel() // samples
    chunk = max(_MIN_CHUNK, -(-n // _MAX_CHUNKS))
    chunks = -(-n // chunk)
    same_ref, a_ref = a_ref is None, a_hat if a_ref is None else a_ref
    channels, stride_c = x.shape[1], x.stride(1)
    has_split = split > 0
    if one_pass:
        # The interpreter runs programs one after another, where a barrier between two would never open.
        max_chunks = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        chunk, chunks = one_pass_chunks(n, max_chunks)
        ranges = torch.full((samples, 2, 3), float("-inf"), dtype=torch.float32, device=x.device)
        counts = torch.zeros((1 + samples,), dtype=torch.int32, device=x.device)
        torch.library.wrap_triton(kernels.one_pass_kernel)[(samples * chunks,)](
            x, a_ref, a_hat, ranges, counts, levels, qmin, qmax, n, chunks, chunk, channels, stride_c, split,
            HAS_SPLIT=has_split, ASYMMETRIC=scheme == "asymmetric", FLOOR=floor, SAME_REF=same_ref, BLOCK=_BLOCK)
        return
    partials = torch.empty((samples, chunks, 2, 3), dtype=torch.float32, device=x.device)
    torch.library.wrap_triton(kernels.ranges_kernel)[(samples, chunks)](
        x, a_ref, partials, n, chunks, chunk, channels, stride_c, split, HAS_SPLIT=has_split, BLOCK=_BLOCK)
    torch.library.wrap_triton(kernels.update_kernel)[(samples, chunks)](
        x, a_ref, a_hat, partials, levels, qmin, qmax, n, chunks, chunk, channels, stride_c, split,
        HAS_SPLIT=has_split, ASYMMETRIC=scheme == "asymmetric", FLOOR=floor, SAME_REF=same_ref, GP=_pow2(chunks),
        BLOCK=_BLOCK)


@contextlib.contextmanager
def one_pass_modulation(enabled: bool = True) -> Iterator[None]:
    """Within the block, the modulation step is one launch (`modulate_triton.one_pass_kernel`) instead of two.
    The choice is an argument of the op that `launch_modulate` calls: a compiled network records it, compiles
    again when called with the other choice (Dynamo guards on it), and the compile caches on disk key on it."""
    global _ONE_PASS
    before, _ONE_PASS = _ONE_PASS, enabled
    try:
        yield
    finally:
        _ONE_PASS = before


_OP: Optional[Callable[..., Tensor]] = None  # `_modulate` as a triton_op, registered by `register_op`
_SOURCE = ""  # `source_digest` of this module and its kernels, taken by `register_op`


def register_op() -> None:
    """Register the triton_op (once; a no-op without Triton). Registering imports Triton and torch._inductor
    (1.4 s), so `trajectory()` calls it on entry instead of modiff doing it on import; a compiled graph then
    only reads `_OP`."""
    global _OP, _SOURCE
    if _OP is None and _TRITON:
        _SOURCE = source_digest("modulate", "modulate_triton")
        _OP = torch.library.triton_op("modiff::modulate_per_sample", _modulate, mutates_args=("a_hat",))


def modulate_per_sample(x: Tensor, a_hat: Tensor, a_ref: Optional[Tensor], spec: QuantSpec, split: Optional[int],
                        grid: Optional[Grid] = None) -> None:
    """a_hat += Q(x - a_ref) in place, in a_hat's dtype, Q dynamic per sample (per channel half with `split`).

    a_ref None means a_hat itself (MoDiff's error compensation): it is then read once per value. ``grid``:
    the quantizer's grid on x's device (the layers pass their buffers); None builds it from ``spec`` (a
    host-to-device copy).
    """
    if not fused_modulate_supported(x, a_hat, a_ref, spec):
        raise ValueError("modulate_per_sample needs per-sample dynamic quantization (bits >= 2) of CUDA tensors "
                         "of one shape and one contiguous or channels_last layout (see fused_modulate_supported)")
    if split is not None and not 0 < split < x.shape[1]:
        raise ValueError(f"split must be in (0, {x.shape[1]}) channels, got {split}")
    launch_modulate(x, a_hat, a_ref, spec, split, grid)


def launch_modulate(x: Tensor, a_hat: Tensor, a_ref: Optional[Tensor], spec: QuantSpec, split: Optional[int],
                    grid: Optional[Grid] = None) -> None:
    """`modulate_per_sample` without its checks, for layers that made them when they were built: a compiled
    network tracing ``spec.bits >= 2`` would guard on the bit width and compile again for every preset."""
    register_op()
    levels, qmin, qmax = (t.to(x.device) for t in (grid or quant_grid(spec)))
    # The kernel choice and the code's digest are arguments of the op, not read in its body: a compiled graph, and
    # the compile caches' keys, see the op's arguments only (a warm cache would replay the other kernel, or old code).
    _OP(x, a_hat, a_ref, levels, qmin, qmax, spec.scheme, spec.rounding == "floor", split or 0, _ONE_PASS, _SOURCE)
