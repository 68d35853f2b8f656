"""Triton kernels of the real W8A8 and W4A8 backend (`modiff.quant.kernels.real`): three launches per layer call.

    absmax    program (b, g): max |r| over one chunk of sample b, r = a_t - a_hat (modulated) or a_t (direct),
              stored into partials (B, G) by its only writer
    quantize  program (b, g): the sample's scale s = max(absmax / levels, MIN_SCALE) from its partials (levels 127
              for INT8, 448 for FP8 e4m3), then for the chunk's values the code q of r / s (int8, or the bits of an
              e4m3 value), stored into the code buffer; modulated: a_hat += s q in place (the MoDiff update, in
              float32, stored in a_hat's dtype). Program (b, 0) writes s into scales (B,)
    gemm      program (tile of M, tile of N): implicit GEMM over the codes, NHWC: M = B Ho Wo output pixels,
              N output channels, K = kh kw C (tap-major); int8 x int8 -> int32 or e4m3 x e4m3 -> float32 on tensor
              cores, then the epilogue delta = s_a[b] s_w[n] acc; modulated: o_hat += delta (in place) and
              out = o_hat; direct: out = delta + bias. 4-bit weights (W4A8) arrive two per byte and are widened
              to int8 as each tile is loaded (q - z = nibble - offset[n]): Hopper's integer MMA takes 8 bits at
              the narrowest, so the product is the W8A8 one

A Linear layer is the 1x1 case with H = 1, W = tokens per sample. The code buffer and the state share the
input's physical layout (NHWC dense: channels_last, or a contiguous (B, ..., C) for Linear), so one sample is one
dense run of memory and (b, h, w, c) is at ((b H + h) W + w) C + c.

The quantize step follows `modiff.quant.primitives` (IEEE divisions, x * (1 / s), round half to even) and
`modiff.quant.formats` (e4m3 round to nearest even, computed here in float32 so that the cast to fp8 is exact on
every device, the Triton interpreter included). Set TRITON_INTERPRET=1 before this module is imported to run the
kernels on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

from modiff.quant.kernels.modulate_triton import _round_half_even, _round_to_bfloat16

MIN_SCALE = tl.constexpr(1e-12)  # primitives.MIN_SCALE
FP8_MAX = tl.constexpr(448.0)


@triton.jit
def absmax_kernel(x_ptr, hat_ptr, part_ptr, N, G, chunk, MODULATED: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, g): max |r| over values [g chunk, (g + 1) chunk) of sample b. Non-finite inputs give undefined
    codes (the simulator propagates NaN; sampling that meets one has failed either way)."""
    b, g = tl.program_id(0), tl.program_id(1)
    base = b.to(tl.int64) * N
    top = tl.zeros([BLOCK], tl.float32)
    end = tl.minimum((g + 1) * chunk, N)
    for start in range(g * chunk, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        r = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if MODULATED:
            r = r - tl.load(hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.abs(r))
    tl.store(part_ptr + b * G + g, tl.max(top, axis=0))


@triton.jit
def round_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest float8 e4m3fn value, ties to even, still in float32: the
    step is 2^(e - 3) for v in [2^e, 2^(e+1)), e >= -6, and 2^-9 below (subnormals)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    return _round_half_even(v * inverse) * step


@triton.jit
def quantize_kernel(x_ptr, hat_ptr, code_ptr, scale_ptr, part_ptr, N, G, chunk,
                    MODULATED: tl.constexpr, FP8: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, g): codes of the chunk's residuals (see the module docstring); a_hat += s q if MODULATED.
    The levels are a float32 made here: a float argument reaches a kernel compiled by inductor as float64,
    which div_rn refuses."""
    b, g = tl.program_id(0), tl.program_id(1)
    if FP8:
        levels = tl.full([], 448.0, tl.float32)
    else:
        levels = tl.full([], 127.0, tl.float32)
    gs = tl.arange(0, GP)
    absmax = tl.max(tl.load(part_ptr + b * G + gs, mask=gs < G, other=0.0), axis=0)
    scale = tl.maximum(tl.math.div_rn(absmax, levels), MIN_SCALE)
    inverse = tl.math.div_rn(1.0, scale)
    if g == 0:
        tl.store(scale_ptr + b, scale)
    base = b.to(tl.int64) * N
    end = tl.minimum((g + 1) * chunk, N)
    for start in range(g * chunk, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < end
        r = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if MODULATED:
            hat = tl.load(hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            r = r - hat
        scaled = r * inverse
        if FP8:
            code = round_e4m3(tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX))
            tl.store(code_ptr + base + offs, code.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
        else:
            code = tl.minimum(tl.maximum(_round_half_even(scaled), -levels), levels)
            tl.store(code_ptr + base + offs, code.to(tl.int8), mask=mask)
        if MODULATED:
            new = hat + code * scale
            if hat_ptr.dtype.element_ty == tl.bfloat16:
                new = _round_to_bfloat16(new)
            tl.store(hat_ptr + base + offs, new.to(hat_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stored(v, ptr):
    """v (float32) as the element type of ptr, rounded to nearest even also in the interpreter."""
    if ptr.dtype.element_ty == tl.bfloat16:
        v = _round_to_bfloat16(v)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _int4_weight_tile(w_ptr, offset, rn, n_ok, tap, first, pair_bytes, TAPS: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) int8 tile of weight codes q - z for channels [first, first + BLOCK_K) of one tap, from
    the nibble-packed matrix (N, TAPS pair_bytes) bytes, pair_bytes = ceil(C / 2)
    (`modiff.quant.kernels.real.pack_weight_int4`): channel 2j in the low nibble of byte j, 2j + 1 in the high one;
    q - z = nibble - offset[n]. Rows past C load as -offset, against activation codes masked to 0."""
    half = first // 2 + tl.arange(0, BLOCK_K // 2)
    byte = (tap * pair_bytes + half).to(tl.int64)
    packed = tl.load(w_ptr + rn[None, :].to(tl.int64) * (TAPS * pair_bytes) + byte[:, None],
                     mask=(half < pair_bytes)[:, None] & n_ok[None, :], other=0).to(tl.int32)
    low = (packed & 15) - offset[None, :]
    high = (packed >> 4) - offset[None, :]
    return tl.join(low, high).permute(0, 2, 1).reshape(BLOCK_K, BLOCK_N).to(tl.int8)


@triton.jit
def gemm_kernel(code_ptr, w_ptr, a_scale_ptr, w_scale_ptr, w_offset_ptr, bias_ptr, o_hat_ptr, out_ptr,
                M, N, C, H, W, HoWo, Wo, stride_h, stride_w, pad_h, pad_w, pair_bytes,
                KW: tl.constexpr, TAPS: tl.constexpr, FP8: tl.constexpr, INT4_WEIGHTS: tl.constexpr,
                MODULATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (tile m, tile n) of out (M, N) = codes (M, K) @ w (N, K)^T, K = TAPS C, with the epilogue above.
    INT4_WEIGHTS: w holds nibbles (`_int4_weight_tile`), w_offset_ptr the per-channel offsets, and pair_bytes = ceil(C
    / 2) comes as an argument rather than computed here: Triton then knows it divisible by 16 where it is (C a
    multiple of 32) and pipelines the weight tiles' loads as it does the 8-bit ones (asynchronous copies, several
    stages ahead; `benchmarks/compile_real_gemm.py`). Ignored for 8-bit weights."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    b = rm // HoWo
    pixel = rm % HoWo
    h0 = (pixel // Wo) * stride_h - pad_h
    w0 = (pixel % Wo) * stride_w - pad_w
    sample = b.to(tl.int64) * H * W * C
    if FP8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    if INT4_WEIGHTS:
        offset = tl.load(w_offset_ptr + rn, mask=n_ok, other=0)
    blocks = tl.cdiv(C, BLOCK_K)
    for it in range(0, TAPS * blocks):
        tap = it // blocks
        c = (it % blocks) * BLOCK_K + rk
        h = h0 + tap // KW
        w = w0 + tap % KW
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        row = sample + (h * W + w).to(tl.int64) * C
        c_ok = c < C
        a = tl.load(code_ptr + row[:, None] + c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0)
        if INT4_WEIGHTS:
            bw = _int4_weight_tile(w_ptr, offset, rn, n_ok, tap, (it % blocks) * BLOCK_K, pair_bytes, TAPS, BLOCK_K,
                                   BLOCK_N)
        else:
            k = (tap * C + c).to(tl.int64)
            bw = tl.load(w_ptr + rn[None, :].to(tl.int64) * (TAPS * C) + k[:, None],
                         mask=c_ok[:, None] & n_ok[None, :], other=0)
        if FP8:
            a = a.to(tl.float8e4nv, bitcast=True)
            bw = bw.to(tl.float8e4nv, bitcast=True)
            acc = tl.dot(a, bw, acc)
        else:
            acc = tl.dot(a, bw, acc, out_dtype=tl.int32)  # Triton's default out_dtype (float32) refuses an int32 acc
    a_scale = tl.load(a_scale_ptr + b, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    delta = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if MODULATED:
        o = tl.load(o_hat_ptr + offs, mask=mask, other=0.0).to(tl.float32) + delta
        o = _stored(o, o_hat_ptr).to(tl.float32)
        tl.store(o_hat_ptr + offs, o.to(o_hat_ptr.dtype.element_ty), mask=mask)
    elif HAS_BIAS:
        o = delta + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        o = delta
    tl.store(out_ptr + offs, _stored(o, out_ptr), mask=mask)
