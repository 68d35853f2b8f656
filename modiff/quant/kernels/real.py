"""The real backend's kernels as torch ops: direct and modulated (MoDiff) Conv2d/Linear, W8A8 in INT8 or FP8 e4m3,
and W4A8 (4-bit integer weights, INT8 activations).

What they compute (the numerics the simulator reproduces with `QuantConfig.simulated()`):

- weights: per output channel, symmetric, s_w = max(absmax / L, MIN_SCALE) with L = 127 (INT8: codes in
  [-127, 127], round half to even) or 448 (FP8: e4m3 values, `modiff.quant.formats`), packed once at quantize
  time into a (C_out, kh kw C_in) matrix of codes, K contiguous (`pack_weight`); or 4-bit codes q on any of the
  simulator's 4-bit per-channel grids (symmetric, or asymmetric with an integer zero point z), packed two per
  byte (`pack_weight_int4`) and multiplied as the int8 values q - z;
- activations: r = a_t - a_hat (modulated) or a_t (direct), one dynamic scale per sample
  s_a = max(max |r| / L, MIN_SCALE), codes q = Q(r / s_a) as above;
- product: sum q_a q_w on tensor cores, int32 (INT8, exact) or float32 (FP8) accumulation;
- modulated: a_hat += s_a q_a and o_hat += s_a s_w acc, in the state's dtype, both in place (their addresses
  stay fixed, so CUDA graphs replay the step); the layer's output is o_hat. The bias entered o_hat at warm-up.
  direct: output = s_a s_w acc + bias.

The simulator computes the same codes; its output A_q(a_hat) + b is recomputed in floating point where the
kernels accumulate o_hat, so the two agree exactly when every value is exact in float32 (tests pick such
inputs) and to float32 rounding otherwise, plus the rounding of o_hat's dtype once per step (bf16 state: the
error feedback does not see o_hat's rounding; `benchmarks/bench_real.py` measures it against float32 state).

Registered as `torch.library.triton_op`s (`register_ops`), so a compiled network launches the kernels from its
own graph; no host synchronisation anywhere. Tensors: the input and the state in one NHWC-dense layout
(channels_last (B, C, H, W), or contiguous (B, ..., C) for Linear).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from modiff.quant.formats import NumberFormat
from modiff.quant.kernels import source_digest

__all__ = ["Geometry", "pack_weight", "pack_weight_int4", "real_direct", "real_modulated", "register_ops", "TRITON",
           "CANDIDATE_TILINGS", "gemm_arguments", "gemm_blocks", "gemm_tiling", "heuristic_blocks", "measured_tilings",
           "tiling_key"]

TRITON = importlib.util.find_spec("triton") is not None
_BLOCK = 1024  # values per loop iteration of the absmax/quantize programs
_MIN_CHUNK = 4096  # values of one sample per program
_MAX_CHUNKS = 256

# (B, H, W, C, Ho, Wo, N, kh, kw, stride_h, stride_w, pad_h, pad_w) of one call: the implicit GEMM's geometry
Geometry = list[int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pack_weight(codes: Tensor, format: NumberFormat) -> Tensor:
    """Weight codes (C_out, C_in[, kh, kw]) as the GEMM's (C_out, kh kw C_in) matrix, tap-major along K and
    K contiguous (Hopper's 8-bit tensor-core instructions read both operands K-major; an N-major B would be
    transposed on chip): int8, or the bits of e4m3 values as uint8 (`codes` then holds e4m3-exact values)."""
    matrix = (codes.permute(0, 2, 3, 1) if codes.ndim == 4 else codes).reshape(codes.shape[0], -1).contiguous()
    if format == "fp8_e4m3":
        return matrix.float().to(torch.float8_e4m3fn).view(torch.uint8)
    return matrix.to(torch.int8)


def pack_weight_int4(codes: Tensor, zero_point: Tensor, qmin: int) -> tuple[Tensor, Tensor]:
    """4-bit weight codes (C_out, C_in[, kh, kw]) in [qmin, qmin + 15] with per-channel integer zero points z, as
    (packed, offset): packed (C_out, kh kw ceil(C_in / 2)) uint8, tap-major like `pack_weight`, the nibble
    q - qmin of channel 2j in the low half of byte j and of 2j + 1 in the high half (an odd C_in padded with a
    zero nibble per tap, so that no byte spans two taps), and offset (C_out,) int32 = z - qmin, which the kernel
    subtracts from each nibble to get q - z."""
    matrix = codes.permute(0, 2, 3, 1) if codes.ndim == 4 else codes
    unsigned = matrix - qmin
    if unsigned.numel() and (unsigned.min() < 0 or unsigned.max() > 15 or not torch.equal(unsigned, unsigned.round())):
        raise ValueError(f"4-bit weight codes must be integers in [{qmin}, {qmin + 15}]; got values in "
                         f"[{float(matrix.min())}, {float(matrix.max())}]")
    unsigned = torch.nn.functional.pad(unsigned, (0, unsigned.shape[-1] % 2)).to(torch.uint8)
    rows = unsigned.reshape(codes.shape[0], -1)
    packed = (rows[:, 0::2] | (rows[:, 1::2] << 4)).contiguous()
    offset = (zero_point.reshape(-1).expand(codes.shape[0]) - qmin).round().to(torch.int32).contiguous()
    return packed, offset


TILING_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
Tiling = tuple[int, int, int, int, int]  # in the order of TILING_KEYS
# The tilings `benchmarks/bench_real_gemm.py` times beside the heuristic, and the only ones a measured table may
# name: the value tests run each of them.
CANDIDATE_TILINGS: tuple[Tiling, ...] = (
    (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4))
TILINGS_FILE = Path(__file__).with_name("gemm_tilings.json")


def tiling_key(fp8: bool, taps: int, c: int, n: int, m: int, int4_weights: bool = False) -> str:
    """How `gemm_tilings.json` names a GEMM: format (int8, fp8, or w4a8 for 4-bit weights), taps (kh kw), channels
    in, channels out, and its rows (batch x output pixels) to the power of two below them: the best tiling of 8x8
    and 16x16 maps of 256 channels differs, and a tiling measured at one batch says nothing of another an order
    of magnitude away."""
    operands = "w4a8" if int4_weights else ("fp8" if fp8 else "int8")
    return f"{operands} taps{taps} c{c} n{n} m2^{max(m, 1).bit_length() - 1}"


_TABLE: Optional[dict[str, Tiling]] = None  # the table `measured_tilings` read


def measured_tilings() -> dict[str, Tiling]:
    """The per-shape tilings chosen from a benchmark (`bench_real_gemm.py --tilings-out`), if the file is there;
    ValueError for a tiling outside CANDIDATE_TILINGS (only those are value-tested). Read once and kept in a
    module global, not a functools cache: torch.compile traces a global's read, where it would trace a cache
    wrapper's function, file reads included, and break the graph."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _read_tilings()
    return _TABLE


def _read_tilings() -> dict[str, Tiling]:
    if not TILINGS_FILE.is_file():
        return {}
    try:
        table = {key: tuple(value) for key, value in json.loads(TILINGS_FILE.read_text())["tilings"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{TILINGS_FILE} is not a tilings table ({err!r}); write it again with "
                         f"`benchmarks/bench_real_gemm.py --tilings-out`, or delete it to use the heuristic") from None
    unknown = {key: t for key, t in table.items() if t not in CANDIDATE_TILINGS}
    if unknown:
        raise ValueError(f"{TILINGS_FILE} names tilings outside CANDIDATE_TILINGS (not value-tested): {unknown}")
    return table


def heuristic_blocks(m: int, n: int, c: int) -> dict[str, int]:
    """Tile sizes for the GEMM: 8-bit operands want K tiles of 64 (128 bytes per row); tl.dot needs >= 16 per dim
    and Hopper's 8-bit MMA K >= 32. Not autotuned (an autotuner would time kernels inside a CUDA graph capture,
    and replay the modulated epilogue's in-place o_hat accumulation)."""
    block_n = 128 if n > 64 else (64 if n > 32 else 32)
    block_m = 128 if m >= 4096 else 64
    block_k = 64 if c > 32 else 32
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)


def gemm_blocks(m: int, n: int, c: int, taps: int, fp8: bool, int4_weights: bool = False) -> dict[str, int]:
    """The measured tiling of this GEMM's shape and row scale (`measured_tilings`), else `heuristic_blocks`."""
    tuned = measured_tilings().get(tiling_key(fp8, taps, c, n, m, int4_weights))
    return dict(zip(TILING_KEYS, tuned)) if tuned else heuristic_blocks(m, n, c)


def _codes(x: Tensor, a_hat: Optional[Tensor], fp8: bool) -> tuple[Tensor, Tensor]:
    """(codes shaped like x, per-sample scales (B,)); a_hat (None: direct) is advanced in place."""
    from modiff.quant.kernels import real_triton as kernels  # imported on first use: TRITON_INTERPRET is read then

    samples = x.shape[0]
    n = x.numel() // samples
    chunk = max(_MIN_CHUNK, _cdiv(n, _MAX_CHUNKS))
    chunks = _cdiv(n, chunk)
    partials = torch.empty((samples, chunks), dtype=torch.float32, device=x.device)
    codes = torch.empty_like(x, dtype=torch.uint8 if fp8 else torch.int8)
    scales = torch.empty((samples,), dtype=torch.float32, device=x.device)
    modulated = a_hat is not None
    hat = a_hat if modulated else x
    torch.library.wrap_triton(kernels.absmax_kernel)[(samples, chunks)](
        x, hat, partials, n, chunks, chunk, MODULATED=modulated, BLOCK=_BLOCK)
    torch.library.wrap_triton(kernels.quantize_kernel)[(samples, chunks)](
        x, hat, codes, scales, partials, n, chunks, chunk,
        MODULATED=modulated, FP8=fp8, GP=_pow2(chunks), BLOCK=_BLOCK)
    return codes, scales


def _fp8(weight: Tensor, weight_offset: Optional[Tensor]) -> bool:
    """Whether the weights (and so the activations) are e4m3: uint8 without offsets (4-bit weights have them)."""
    return weight.dtype == torch.uint8 and weight_offset is None


def gemm_arguments(codes: Tensor, scales: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                   o_hat: Optional[Tensor], out: Tensor, geometry: Geometry,
                   weight_offset: Optional[Tensor] = None) -> tuple[list, dict[str, object]]:
    """The GEMM kernel's runtime arguments, in order, and its constexprs other than the tiling: what `_gemm`
    launches, and what `benchmarks/compile_real_gemm.py` compiles for a GPU it does not have."""
    b, h, w, c, ho, wo, n, kh, kw, sh, sw, ph, pw = geometry
    int4 = weight_offset is not None
    args = [codes, weight, scales, weight_scale, weight_offset if int4 else scales, scales if bias is None else bias,
            out if o_hat is None else o_hat, out, b * ho * wo, n, c, h, w, ho * wo, wo, sh, sw, ph, pw, (c + 1) // 2]
    constexprs = dict(KW=kw, TAPS=kh * kw, FP8=_fp8(weight, weight_offset), INT4_WEIGHTS=int4,
                      MODULATED=o_hat is not None, HAS_BIAS=bias is not None)
    return args, constexprs


def _gemm(codes: Tensor, scales: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
          o_hat: Optional[Tensor], geometry: Geometry, out_dtype: torch.dtype, blocks: dict[str, int],
          weight_offset: Optional[Tensor] = None) -> Tensor:
    """The implicit GEMM with its epilogue, tiled by `blocks` (tile sizes, warps, stages; `gemm_blocks` names them).
    ``weight_offset``: the per-channel offsets of nibble-packed 4-bit weights (`pack_weight_int4`); None for 8-bit."""
    from modiff.quant.kernels import real_triton as kernels

    m, n = geometry[0] * geometry[4] * geometry[5], geometry[6]  # B Ho Wo rows, N columns
    out = torch.empty((m, n), dtype=out_dtype, device=codes.device)
    args, constexprs = gemm_arguments(codes, scales, weight, weight_scale, bias, o_hat, out, geometry, weight_offset)
    grid = (_cdiv(m, blocks["BLOCK_M"]), _cdiv(n, blocks["BLOCK_N"]))
    torch.library.wrap_triton(kernels.gemm_kernel)[grid](*args, **constexprs, **blocks)
    return out


def _direct(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], geometry: list[int],
            out_dtype: torch.dtype, weight_offset: Optional[Tensor], tiling: list[int], source: str) -> Tensor:
    # ``source``: read by no kernel; an argument so that the compile caches see the code (`source_digest`)
    codes, scales = _codes(x, None, _fp8(weight, weight_offset))
    return _gemm(codes, scales, weight, weight_scale, bias, None, geometry, out_dtype, dict(zip(TILING_KEYS, tiling)),
                 weight_offset)


def _modulated(x: Tensor, a_hat: Tensor, o_hat: Tensor, weight: Tensor, weight_scale: Tensor, geometry: list[int],
               out_dtype: torch.dtype, weight_offset: Optional[Tensor], tiling: list[int], source: str) -> Tensor:
    codes, scales = _codes(x, a_hat, _fp8(weight, weight_offset))
    return _gemm(codes, scales, weight, weight_scale, None, o_hat, geometry, out_dtype, dict(zip(TILING_KEYS, tiling)),
                 weight_offset)


_OPS: dict[str, Callable[..., Tensor]] = {}
_SOURCE = ""  # `source_digest` of this module and its kernels, taken by `register_ops`


def register_ops() -> None:
    """Register the two triton_ops (once; a no-op without Triton). Registering imports Triton and
    torch._inductor, so the layers call it when built on a machine with CUDA, not modiff on import."""
    global _SOURCE
    if _OPS or not TRITON:
        return
    measured_tilings()  # read (and checked) here, eagerly, not first under a compiler's tracing
    _SOURCE = source_digest("real", "real_triton")
    _OPS["direct"] = torch.library.triton_op("modiff::real_direct", _direct, mutates_args=())
    _OPS["modulated"] = torch.library.triton_op("modiff::real_modulated", _modulated,
                                                mutates_args=("a_hat", "o_hat"))


def _nhwc_dense(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t.is_contiguous()


def _check(x: Tensor, *state: Tensor) -> None:
    if not _nhwc_dense(x):
        raise ValueError(f"the real kernels read NHWC-dense inputs (channels_last, or contiguous for Linear); got "
                         f"shape {tuple(x.shape)} with strides {x.stride()}")
    for t in state:
        if t.shape != x.shape or not _nhwc_dense(t):
            raise ValueError(f"the MoDiff state must have the input's shape {tuple(x.shape)} and NHWC-dense layout; "
                             f"got shape {tuple(t.shape)} with strides {t.stride()}")


def gemm_tiling(geometry: Geometry, weight: Tensor, weight_offset: Optional[Tensor]) -> list[int]:
    """The tiling (`TILING_KEYS` in order) `gemm_blocks` picks for a call of this geometry and these weights. The ops
    take it as an argument rather than read the table in their bodies: a compiled graph, and the compile caches'
    keys, see an op's arguments only, so a warm cache would otherwise replay the tiling of an older table."""
    b, c, ho, wo, n, kh, kw = geometry[0], geometry[3], geometry[4], geometry[5], geometry[6], geometry[7], geometry[8]
    blocks = gemm_blocks(b * ho * wo, n, c, kh * kw, _fp8(weight, weight_offset), weight_offset is not None)
    return [blocks[key] for key in TILING_KEYS]


def real_direct(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], geometry: Geometry,
                out_dtype: torch.dtype, weight_offset: Optional[Tensor] = None) -> Tensor:
    """Direct W8A8 or W4A8: (M, N) = s_a s_w (codes @ weight) + bias, M = B Ho Wo (see the module docstring)."""
    _check(x)
    register_ops()
    return _OPS["direct"](x, weight, weight_scale, bias, geometry, out_dtype, weight_offset,
                          gemm_tiling(geometry, weight, weight_offset), _SOURCE)


def real_modulated(x: Tensor, a_hat: Tensor, o_hat: Tensor, weight: Tensor, weight_scale: Tensor,
                   geometry: Geometry, out_dtype: torch.dtype, weight_offset: Optional[Tensor] = None) -> Tensor:
    """One MoDiff step: a_hat and o_hat advanced in place; returns o_hat as (M, N) in ``out_dtype``."""
    _check(x, a_hat)
    register_ops()
    return _OPS["modulated"](x, a_hat, o_hat, weight, weight_scale, geometry, out_dtype, weight_offset,
                             gemm_tiling(geometry, weight, weight_offset), _SOURCE)
