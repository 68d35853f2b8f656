"""Triton kernels of MoDiff's per-sample dynamic modulation (`modiff.quant.kernels.modulate`).

Two launches per layer call (the default):

    ranges   program (b, g): per-half min and max of r = a_t - a_ref over one chunk of sample b (a NaN is
             flagged apart, so min and max stay NaN-free), stored into partials (B, G, 2, 3) by their only writer
    update   program (b, g): the sample's ranges from its partials -> (scale, zero point) per half, then for
             the same chunk a_hat + Q(r) in float32, stored over a_hat in its dtype (each value is read
             before it is written, by the same program)

or one (`one_pass_kernel`): each program takes the ranges of its chunk, merges them into its sample's by atomics,
waits at a barrier until every chunk of the sample has arrived, then updates the chunk it has just read. Its
second read of a_t and a_ref can then come from L2 (the programs resident meanwhile read some 21 MB on an H100,
benchmarks/README.md), where the update kernel's, launched after every sample's ranges, comes from HBM: 3
input-size passes over HBM instead of 5.
Programs take their (sample, chunk) from a ticket in the order they start, so a waiting program only waits for
programs that have started or start next: no deadlock while a sample's chunks fit on the device at once, which
the launcher ensures (`modiff.quant.kernels.modulate.one_pass_chunks`).

Indices are physical offsets within a sample (the tensors share one sample-major dense layout, so
contiguous and channels_last both work); the channel of an offset is (offset // stride_c) % C, needed
only with a split shortcut. Arithmetic follows `modiff.quant.primitives` step by step: IEEE divisions
(`div_rn`), x * (1 / s), rounding half to even, clamps that keep NaN. Set TRITON_INTERPRET=1 before this
module is imported to run the kernels on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Module constants are plain numbers: inductor copies them into a compiled graph's source by repr.
MIN_SCALE = tl.constexpr(1e-12)  # primitives.MIN_SCALE (a compiled kernel reads no other module globals)
ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + ROUNDER - ROUNDER rounds |v| < 2^22 half to even
EXACT = tl.constexpr(4194304.0)  # 2^22: above it every float32 is an integer and the code saturates anyway


@triton.jit
def _second_half(offs, stride_c, C, split, HAS_SPLIT: tl.constexpr):
    if HAS_SPLIT:
        return ((offs // stride_c) % C) >= split
    return offs < 0


@triton.jit
def _chunk_ranges(x_ptr, ref_ptr, base, begin, end, C, stride_c, split, HAS_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """(min, max, has NaN) of r = a_t - a_ref per half over values [begin, end) of the sample at base."""
    lo0 = tl.full([BLOCK], float("inf"), tl.float32)
    hi0 = tl.full([BLOCK], float("-inf"), tl.float32)
    nan0 = tl.zeros([BLOCK], tl.int32)
    lo1, hi1, nan1 = lo0, hi0, nan0
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        r = (tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
             - tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
        number = mask & (r == r)
        second = _second_half(offs, stride_c, C, split, HAS_SPLIT)
        lo0 = tl.minimum(lo0, tl.where(number & ~second, r, float("inf")))
        hi0 = tl.maximum(hi0, tl.where(number & ~second, r, float("-inf")))
        nan0 = tl.maximum(nan0, (mask & ~number & ~second).to(tl.int32))
        if HAS_SPLIT:
            lo1 = tl.minimum(lo1, tl.where(number & second, r, float("inf")))
            hi1 = tl.maximum(hi1, tl.where(number & second, r, float("-inf")))
            nan1 = tl.maximum(nan1, (mask & ~number & second).to(tl.int32))
    return (tl.min(lo0), tl.max(hi0), tl.max(nan0).to(tl.float32),
            tl.min(lo1), tl.max(hi1), tl.max(nan1).to(tl.float32))


@triton.jit
def ranges_kernel(x_ptr, ref_ptr, part_ptr, N, G, chunk, C, stride_c, split, HAS_SPLIT: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Program (b, g): values [g chunk, (g + 1) chunk) of sample b. part: (B, G, half, (min, max, has NaN))."""
    b, g = tl.program_id(0), tl.program_id(1)
    lo0, hi0, nan0, lo1, hi1, nan1 = _chunk_ranges(x_ptr, ref_ptr, b.to(tl.int64) * N, g * chunk,
                                                   tl.minimum((g + 1) * chunk, N), C, stride_c, split, HAS_SPLIT,
                                                   BLOCK)
    out = part_ptr + (b * G + g) * 6
    tl.store(out, lo0)
    tl.store(out + 1, hi0)
    tl.store(out + 2, nan0)
    tl.store(out + 3, lo1)
    tl.store(out + 4, hi1)
    tl.store(out + 5, nan1)


@triton.jit
def _round_half_even(v):
    rounded = tl.where(tl.abs(v) >= EXACT, v, (v + ROUNDER) - ROUNDER)
    return tl.where(rounded == 0, v * 0.0, rounded)  # the sign of zero, as torch.round keeps it


@triton.jit
def _round_to_bfloat16(v):
    """v rounded to the nearest bfloat16 (ties to even), still in float32: the cast after it is then exact
    everywhere (the Triton interpreter's own float32 -> bfloat16 cast truncates)."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _sample_range(part_ptr, b, G, half, GP: tl.constexpr):
    """(min, max) of one half of sample b over its G partials; NaN if any value was NaN."""
    gs = tl.arange(0, GP)
    mask = gs < G
    at = part_ptr + (b * G + gs) * 6 + half * 3
    lo = tl.min(tl.load(at, mask=mask, other=float("inf")))
    hi = tl.max(tl.load(at + 1, mask=mask, other=float("-inf")))
    nan = tl.max(tl.load(at + 2, mask=mask, other=0.0)) > 0
    return tl.where(nan, float("nan"), lo), tl.where(nan, float("nan"), hi)


@triton.jit
def _clamp(v, qmin, qmax):
    return tl.minimum(tl.maximum(v, qmin, propagate_nan=tl.PropagateNan.ALL), qmax, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _qparams(lo, hi, levels, qmin, qmax, ASYMMETRIC: tl.constexpr):
    """(scale, zero point) as `primitives.qparams_from_range`; levels = 2^b - 1 or 2^(b-1) - 1 (float32)."""
    if ASYMMETRIC:
        x_min = tl.minimum(lo, 0.0, propagate_nan=tl.PropagateNan.ALL)
        x_max = tl.maximum(hi, 0.0, propagate_nan=tl.PropagateNan.ALL)
        scale = tl.maximum(tl.math.div_rn(x_max - x_min, levels), MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)
        zero = _clamp(_round_half_even(tl.math.div_rn(-x_min, scale)), qmin, qmax)
    else:
        absmax = tl.maximum(tl.abs(lo), tl.abs(hi), propagate_nan=tl.PropagateNan.ALL)
        scale = tl.maximum(tl.math.div_rn(absmax, levels), MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)
        zero = tl.full([], 0.0, tl.float32)
    return scale, zero


@triton.jit
def _update_chunk(x_ptr, ref_ptr, hat_ptr, base, begin, end, scale0, zero0, scale1, zero1, qmin, qmax, C, stride_c,
                  split, HAS_SPLIT: tl.constexpr, FLOOR: tl.constexpr, SAME_REF: tl.constexpr, BLOCK: tl.constexpr):
    """a_hat = (a_hat + Q(a_t - a_ref)).to(a_hat dtype) over values [begin, end) of the sample at base."""
    inverse0, inverse1 = tl.math.div_rn(1.0, scale0), tl.math.div_rn(1.0, scale1)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        ref = tl.load(ref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - ref
        second = _second_half(offs, stride_c, C, split, HAS_SPLIT)
        scale, zero = tl.where(second, scale1, scale0), tl.where(second, zero1, zero0)
        scaled = r * tl.where(second, inverse1, inverse0)
        if FLOOR:
            code = tl.floor(scaled)
        else:
            code = _round_half_even(scaled)
        code = _clamp(code + zero, qmin, qmax)
        q = (code - zero) * scale
        hat = ref if SAME_REF else tl.load(hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        new = hat + q
        if hat_ptr.dtype.element_ty == tl.bfloat16:
            new = _round_to_bfloat16(new)
        tl.store(hat_ptr + base + offs, new.to(hat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def update_kernel(x_ptr, ref_ptr, hat_ptr, part_ptr, levels_ptr, qmin_ptr, qmax_ptr, N, G, chunk, C, stride_c, split,
                  HAS_SPLIT: tl.constexpr, ASYMMETRIC: tl.constexpr, FLOOR: tl.constexpr, SAME_REF: tl.constexpr,
                  GP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, g): a_hat = (a_hat + Q(a_t - a_ref)).to(a_hat dtype) over the chunk's values (`_modulate`).
    The grid (levels, qmin, qmax) is read from memory, so one compiled kernel serves every bit width."""
    b, g = tl.program_id(0), tl.program_id(1)
    levels, qmin, qmax = tl.load(levels_ptr), tl.load(qmin_ptr), tl.load(qmax_ptr)
    lo, hi = _sample_range(part_ptr, b, G, 0, GP)
    scale0, zero0 = _qparams(lo, hi, levels, qmin, qmax, ASYMMETRIC)
    scale1, zero1 = scale0, zero0
    if HAS_SPLIT:
        lo, hi = _sample_range(part_ptr, b, G, 1, GP)
        scale1, zero1 = _qparams(lo, hi, levels, qmin, qmax, ASYMMETRIC)
    _update_chunk(x_ptr, ref_ptr, hat_ptr, b.to(tl.int64) * N, g * chunk, tl.minimum((g + 1) * chunk, N), scale0,
                  zero0, scale1, zero1, qmin, qmax, C, stride_c, split, HAS_SPLIT, FLOOR, SAME_REF, BLOCK)


@triton.jit
def _merge_range(at, lo, hi, nan):
    """Merge one chunk's (min, max, has NaN) of a half into its sample's: at holds (-min, max, has NaN), each
    merged by an atomic max, so one fill with -inf starts them all."""
    tl.atomic_max(at, -lo)
    tl.atomic_max(at + 1, hi)
    tl.atomic_max(at + 2, nan)


@triton.jit
def _merged_range(at):
    """(min, max) of a half from `_merge_range`'s slots, NaN if any value was; read by atomics (at L2, where the
    other programs' merges are)."""
    lo = -tl.atomic_max(at, float("-inf"))
    hi = tl.atomic_max(at + 1, float("-inf"))
    nan = tl.atomic_max(at + 2, float("-inf")) > 0
    return tl.where(nan, float("nan"), lo), tl.where(nan, float("nan"), hi)


@triton.jit
def one_pass_kernel(x_ptr, ref_ptr, hat_ptr, range_ptr, count_ptr, levels_ptr, qmin_ptr, qmax_ptr, N, G, chunk, C,
                    stride_c, split, HAS_SPLIT: tl.constexpr, ASYMMETRIC: tl.constexpr, FLOOR: tl.constexpr,
                    SAME_REF: tl.constexpr, BLOCK: tl.constexpr):
    """One program per chunk, B G in all (see the module docstring). range: (B, half, (-min, max, has NaN)),
    filled with -inf; count: (1 + B,) int32 zeros, the ticket counter and each sample's arrivals."""
    ticket = tl.atomic_add(count_ptr, 1)
    b, g = ticket // G, ticket % G
    base = b.to(tl.int64) * N
    begin, end = g * chunk, tl.minimum((g + 1) * chunk, N)
    lo0, hi0, nan0, lo1, hi1, nan1 = _chunk_ranges(x_ptr, ref_ptr, base, begin, end, C, stride_c, split, HAS_SPLIT,
                                                   BLOCK)
    at = range_ptr + b * 6
    _merge_range(at, lo0, hi0, nan0)
    if HAS_SPLIT:
        _merge_range(at + 3, lo1, hi1, nan1)
    tl.atomic_add(count_ptr + 1 + b, 1, sem="release")  # after this program's merges
    arrived = tl.atomic_add(count_ptr + 1 + b, 0, sem="acquire")
    while arrived < G:
        arrived = tl.atomic_add(count_ptr + 1 + b, 0, sem="acquire")
    levels, qmin, qmax = tl.load(levels_ptr), tl.load(qmin_ptr), tl.load(qmax_ptr)
    lo, hi = _merged_range(at)
    scale0, zero0 = _qparams(lo, hi, levels, qmin, qmax, ASYMMETRIC)
    scale1, zero1 = scale0, zero0
    if HAS_SPLIT:
        lo, hi = _merged_range(at + 3)
        scale1, zero1 = _qparams(lo, hi, levels, qmin, qmax, ASYMMETRIC)
    _update_chunk(x_ptr, ref_ptr, hat_ptr, base, begin, end, scale0, zero0, scale1, zero1, qmin, qmax, C, stride_c,
                  split, HAS_SPLIT, FLOOR, SAME_REF, BLOCK)
