"""Triton kernels of the fused recording path (`modiff.record.engines.fused.engine`): one launch per site call (scan),
and per model call one summary, up to two count and one add_counts launch for all its site calls.

    scan     one program per (sample, block of channels, 1,024 values per chunk): reads a_s and the buffer's
             a_{s-1}, writes a_s (and a_s - a_{s-1} when a count follows) into the buffer, and reduces both
             rows: per (sample, channel) min/max (NaN flagged as a NaN min) and per (sample, channel block)
             mean and M2 (float32, Chan-merged chunk by chunk), stored into scratch by their only writer
    summary  one program per (site call, row) descriptor: the partials -> min, max, mean, M2, sum x^2, sum ||x_b|| (float64,
             Chan across tiles and samples, then across updates), channel absmax, histogram ranges,
             the float32 bin edges (and their step and offset) and outlier boundaries exactly as `batched.Grid`/`Beyond` build them
    count    histograms of the positions #{edges <= x} (an arithmetic guess, corrected against the
             edges, so the counts equal the sorted-boundary search) and outlier hits, per program in
             registers, stored as int32 into a (descriptor's program, count slot) scratch (on CUDA the
             engine takes the shared-memory CUDA C version of `modiff.record.engines.fused.cuda_count` where it compiles)
    add_counts  sums the scratch over the programs and adds it once into the keys' float64 state (exact
             below 2^53): one writer per slot, so no atomics anywhere

The summary, count and add_counts kernels read their tensors and sizes from a table of int64 descriptors,
one row per (site call, row), with the fields of `modiff.record.engines.fused.layout.DESCRIPTOR` (addresses point at the
row's own part of each tensor).

Semantics follow `modiff.record.results`: NaN is above every boundary, a NaN boundary counts as -inf.
Set TRITON_INTERPRET=1 before this module is imported to run the kernels on CPU tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

from modiff.record.engines.fused.layout import DESCRIPTOR

TINY = tl.constexpr(1.1754943508222875e-38)  # a constexpr: compiled kernels read no other globals; torch.finfo(torch.float32).tiny: the smallest automatic histogram range
_AT = {name: i for i, name in enumerate(DESCRIPTOR)}
# Descriptor fields, as constexprs (a compiled kernel reads no other module globals)
NF = tl.constexpr(len(DESCRIPTOR))
D_PART, D_CHMIN, D_CHMAX = tl.constexpr(_AT["part"]), tl.constexpr(_AT["chmin"]), tl.constexpr(_AT["chmax"])
D_STATE, D_FIRST, D_N_OLD, D_N_NEW = (tl.constexpr(_AT[f]) for f in ("state", "first", "n_old", "n_new"))
D_SITE_RANGE, D_NEW_SITE, D_GRID = tl.constexpr(_AT["site_range"]), tl.constexpr(_AT["new_site"]), tl.constexpr(_AT["grid"])
D_EDGES, D_APPROX, D_BOUNDS = tl.constexpr(_AT["edges"]), tl.constexpr(_AT["approx"]), tl.constexpr(_AT["bounds"])
D_B, D_C, D_R, D_T, D_CPB = (tl.constexpr(_AT[f]) for f in ("samples", "channels", "inner", "tiles", "per_program"))
D_DATA, D_PROGRAMS = tl.constexpr(_AT["data"]), tl.constexpr(_AT["programs"])
D_PARTIAL_AT, D_COUNTS = tl.constexpr(_AT["partial_at"]), tl.constexpr(_AT["counts"])


@triton.jit
def _next_up(v):
    """nextafter(v, +inf) for float32 (NaN and +inf stay)."""
    bits = v.to(tl.int32, bitcast=True)
    up = tl.where(v > 0, bits + 1, bits - 1).to(tl.float32, bitcast=True)
    up = tl.where(v == 0, 1.401298464324817e-45, up)
    return tl.where((v != v) | (v == float("inf")), v, up)


@triton.jit
def _nan_to_low(v):
    """A NaN boundary sorts first (as nan_to_num(nan=-inf) in the reference)."""
    return tl.where(v != v, float("-inf"), v)


@triton.jit
def _nan_max(a, b):
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def _chan(n, mean, m2, n_new, mean_new, m2_new):
    """Chan's merge of (n, mean, M2) with a chunk's (n_new, mean_new, M2_new)."""
    total = n + n_new
    delta = mean_new - mean
    safe = tl.maximum(total, 1.0)
    return total, mean + delta * (n_new / safe), m2 + m2_new + delta * delta * (n * n_new / safe)


@triton.jit
def _chunk_moments(v, mask):
    n = tl.sum(mask.to(tl.float32))
    mean = tl.sum(tl.where(mask, v, 0.0)) / tl.maximum(n, 1.0)
    dev = tl.where(mask, v - mean, 0.0)
    return n, mean, tl.sum(dev * dev)


@triton.jit
def _channel_extremes(v, mask, lo, hi, has_nan):
    """Running per-channel min/max over a [CB, RB] chunk, NaN kept aside as a flag."""
    nan = (v != v) & mask
    lo = tl.minimum(lo, tl.min(tl.where(mask & ~nan, v, float("inf")), axis=1))
    hi = tl.maximum(hi, tl.max(tl.where(mask & ~nan, v, float("-inf")), axis=1))
    return lo, hi, has_nan | (tl.max(nan.to(tl.int32), axis=1) > 0)


@triton.jit
def _store_extremes(chmin_ptr, chmax_ptr, at, cmask, lo, hi, has_nan):
    """A program owns its (sample, channel) extremes: plain stores, a NaN min marking a NaN."""
    tl.store(chmin_ptr + at, tl.where(has_nan, float("nan"), lo), mask=cmask)
    tl.store(chmax_ptr + at, hi, mask=cmask)


@triton.jit
def scan_kernel(x_ptr, buf_ptr, chmin_ptr, chmax_ptr, part_ptr, B, C, R, T,
                HAS_DIFF: tl.constexpr, STORE_DIFF: tl.constexpr, CB: tl.constexpr, RB: tl.constexpr):
    """Program (b, t): sample b, channels [t CB, (t + 1) CB), in chunks of RB values per channel.
    chmin, chmax: (2, B, C); part: (2, B, T, 2) mean and M2. The difference is stored (buffer row 1) only
    for the count kernel (STORE_DIFF). Every size is specialised (none in do_not_specialize): with R known
    to be a multiple of 16, Triton proves the rows aligned and vectorises the loads (benchmarks/README.md
    gives the device time it saves)."""
    b, t = tl.program_id(0), tl.program_id(1)
    numel = B * C * R
    channels = t * CB + tl.arange(0, CB)
    cmask = channels < C
    rows = (b * C + channels[:, None]).to(tl.int64) * R
    n_raw, mean_raw, m2_raw = 0.0, 0.0, 0.0
    n_diff, mean_diff, m2_diff = 0.0, 0.0, 0.0
    lo_raw = tl.full([CB], float("inf"), tl.float32)
    hi_raw = tl.full([CB], float("-inf"), tl.float32)
    nan_raw = tl.zeros([CB], tl.int1)
    lo_diff, hi_diff, nan_diff = lo_raw, hi_raw, nan_raw
    for r0 in range(0, R, RB):
        r = r0 + tl.arange(0, RB)
        mask = cmask[:, None] & (r < R)[None, :]
        offs = rows + r[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DIFF:
            diff = x - tl.load(buf_ptr + offs, mask=mask, other=0.0)
            if STORE_DIFF:
                tl.store(buf_ptr + numel + offs, diff, mask=mask)
            lo_diff, hi_diff, nan_diff = _channel_extremes(diff, mask, lo_diff, hi_diff, nan_diff)
            n_c, mean_c, m2_c = _chunk_moments(diff, mask)
            n_diff, mean_diff, m2_diff = _chan(n_diff, mean_diff, m2_diff, n_c, mean_c, m2_c)
        tl.store(buf_ptr + offs, x, mask=mask)
        lo_raw, hi_raw, nan_raw = _channel_extremes(x, mask, lo_raw, hi_raw, nan_raw)
        n_c, mean_c, m2_c = _chunk_moments(x, mask)
        n_raw, mean_raw, m2_raw = _chan(n_raw, mean_raw, m2_raw, n_c, mean_c, m2_c)
    at = b * C + channels
    _store_extremes(chmin_ptr, chmax_ptr, at, cmask, lo_raw, hi_raw, nan_raw)
    out = part_ptr + (b * T + t) * 2
    tl.store(out, mean_raw)
    tl.store(out + 1, m2_raw)
    if HAS_DIFF:
        _store_extremes(chmin_ptr, chmax_ptr, at + B * C, cmask, lo_diff, hi_diff, nan_diff)
        tl.store(out + B * T * 2, mean_diff)
        tl.store(out + B * T * 2 + 1, m2_diff)


@triton.jit
def _sample_moments(part_ptr, b0, B, C, R, T, CPB, BB: tl.constexpr, TP: tl.constexpr):
    """Per-sample mean and M2 (float64) of samples b0..b0+BB from their tiles; 0 for padding."""
    samples = b0 + tl.arange(0, BB)
    tiles = tl.arange(0, TP)
    mask = (samples < B)[:, None] & (tiles < T)[None, :]
    n_t = (tl.minimum(CPB, C - tiles * CPB) * R).to(tl.float64)[None, :]
    at = part_ptr + (samples[:, None] * T + tiles[None, :]) * 2
    mean_t = tl.load(at, mask=mask, other=0.0).to(tl.float64)
    m2_t = tl.load(at + 1, mask=mask, other=0.0).to(tl.float64)
    d = (C * R).to(tl.float64)
    mean_b = tl.sum(tl.where(mask, n_t * mean_t, 0.0), axis=1) / d
    dev = mean_t - mean_b[:, None]
    m2_b = tl.sum(tl.where(mask, m2_t + n_t * dev * dev, 0.0), axis=1)
    return samples < B, mean_b, m2_b


@triton.jit
def _row_moments(part_ptr, B, C, R, T, CPB, BB: tl.constexpr, TP: tl.constexpr):
    """mean, M2, sum x^2, sum_b ||x_b|| of a row: Chan over the samples (two passes, float64)."""
    d = (C * R).to(tl.float64)
    total = tl.zeros([BB], tl.float64)
    for b0 in range(0, B, BB):
        valid, mean_b, _ = _sample_moments(part_ptr, b0, B, C, R, T, CPB, BB, TP)
        total += tl.where(valid, mean_b, 0.0)
    mean = tl.sum(total) / B
    m2 = tl.zeros([BB], tl.float64)
    sumsq = tl.zeros([BB], tl.float64)
    norms = tl.zeros([BB], tl.float64)
    for b0 in range(0, B, BB):
        valid, mean_b, m2_b = _sample_moments(part_ptr, b0, B, C, R, T, CPB, BB, TP)
        sumsq_b = m2_b + d * mean_b * mean_b
        m2 += tl.where(valid, m2_b + d * (mean_b - mean) * (mean_b - mean), 0.0)
        sumsq += tl.where(valid, sumsq_b, 0.0)
        norms += tl.where(valid, tl.sqrt(sumsq_b), 0.0)
    return mean, tl.sum(m2), tl.sum(sumsq), tl.sum(norms)


@triton.jit
def _channel_extremes_over_samples(chmin_ptr, chmax_ptr, B, C, channels, SB: tl.constexpr, CBS: tl.constexpr):
    """Min, max (NaN left out) and NaN flag of some channels over the samples' extremes in the scan scratch."""
    lo = tl.full([CBS], float("inf"), tl.float32)
    hi = tl.full([CBS], float("-inf"), tl.float32)
    has_nan = tl.zeros([CBS], tl.int32)
    for b0 in range(0, B, SB):
        samples = b0 + tl.arange(0, SB)
        mask = (samples < B)[:, None] & (channels < C)[None, :]
        at = samples[:, None] * C + channels[None, :]
        s_lo = tl.load(chmin_ptr + at, mask=mask, other=float("inf"))
        s_nan = s_lo != s_lo
        lo = tl.minimum(lo, tl.min(tl.where(s_nan, float("inf"), s_lo), axis=0))
        hi = tl.maximum(hi, tl.max(tl.load(chmax_ptr + at, mask=mask, other=float("-inf")), axis=0))
        has_nan = tl.maximum(has_nan, tl.max(s_nan.to(tl.int32), axis=0))
    return lo, hi, has_nan


@triton.jit
def _channel_summary(chmin_ptr, chmax_ptr, absmax_ptr, B, C, first, HAS_CHABS: tl.constexpr, SB: tl.constexpr,
                     CBS: tl.constexpr):
    """Row min and max from the per-sample channel extremes; channel absmax into the state."""
    lo = tl.full([CBS], float("inf"), tl.float32)
    hi = tl.full([CBS], float("-inf"), tl.float32)
    any_nan = tl.zeros([CBS], tl.int32)
    for c0 in range(0, C, CBS):
        channels = c0 + tl.arange(0, CBS)
        mask = channels < C
        c_lo, c_hi, c_nan = _channel_extremes_over_samples(chmin_ptr, chmax_ptr, B, C, channels, SB, CBS)
        lo, hi, any_nan = tl.minimum(lo, c_lo), tl.maximum(hi, c_hi), tl.maximum(any_nan, c_nan)
        if HAS_CHABS:
            new = tl.where(c_nan > 0, float("nan"), tl.maximum(c_hi, -c_lo)).to(tl.float64)
            old = tl.load(absmax_ptr + channels, mask=mask & (first == 0), other=0.0)
            tl.store(absmax_ptr + channels, tl.where(first != 0, new, _nan_max(old, new)), mask=mask)
    nan = tl.max(any_nan) > 0
    return tl.where(nan, float("nan"), tl.min(lo)), tl.where(nan, float("nan"), tl.max(hi))


@triton.jit
def _store_stats(at, first, n_old, n_new, lo, hi, mean, m2, sumsq, norms):
    """Stats state (min, max, mean, M2, sum x^2, sum ||x_b||), merged with the old one (Chan) unless first."""
    keep = first == 0
    old_lo = tl.load(at, mask=keep, other=0.0)
    old_hi = tl.load(at + 1, mask=keep, other=0.0)
    old_mean = tl.load(at + 2, mask=keep, other=0.0)
    old_m2 = tl.load(at + 3, mask=keep, other=0.0)
    n_a = tl.where(keep, n_old, 0).to(tl.float64)
    n_b = n_new.to(tl.float64)
    total, mean, m2 = _chan(n_a, old_mean, old_m2, n_b, mean, m2)
    lo64, hi64 = lo.to(tl.float64), hi.to(tl.float64)
    tl.store(at, tl.where(keep, -_nan_max(-old_lo, -lo64), lo64))
    tl.store(at + 1, tl.where(keep, _nan_max(old_hi, hi64), hi64))
    tl.store(at + 2, mean)
    tl.store(at + 3, m2)
    tl.store(at + 4, sumsq + tl.load(at + 4, mask=keep, other=0.0))
    tl.store(at + 5, norms + tl.load(at + 5, mask=keep, other=0.0))


@triton.jit
def _grid_edges(state_ptr, site_range_ptr, grid_ptr, scale_ptr, edges_ptr, approx_ptr, g, first, new_site, absmax,
                EB: tl.constexpr):
    """Range of grid g (set from absmax when new), its edges (j + lo/w) w and hi+ (as `batched.Grid`)."""
    bins = tl.load(grid_ptr + g * 5)
    mode = tl.load(grid_ptr + g * 5 + 1)  # 0 fixed, 1 per site, 2 per key
    at_key = state_ptr + tl.load(grid_ptr + g * 5 + 4)
    at_site = site_range_ptr + g * 2
    per_key = mode == 2
    is_new = tl.where(per_key, first != 0, (mode == 1) & (new_site != 0))
    half = tl.load(scale_ptr + g) * absmax
    half = tl.where(half != half, half, tl.maximum(half, TINY))
    lo = tl.where(per_key, tl.load(at_key), tl.load(at_site)).to(tl.float32)
    hi = tl.where(per_key, tl.load(at_key + 1), tl.load(at_site + 1)).to(tl.float32)
    lo, hi = tl.where(is_new, -half, lo), tl.where(is_new, half, hi)
    store_key, store_site = is_new & per_key, is_new & ~per_key
    tl.store(at_key, lo.to(tl.float64), mask=store_key)
    tl.store(at_key + 1, hi.to(tl.float64), mask=store_key)
    tl.store(at_site, lo.to(tl.float64), mask=store_site)
    tl.store(at_site + 1, hi.to(tl.float64), mask=store_site)
    step = tl.math.div_rn(hi - lo, bins.to(tl.float32))
    offset = tl.math.div_rn(lo, step)
    out = edges_ptr + tl.load(grid_ptr + g * 5 + 2)
    for j0 in range(0, bins, EB):
        j = j0 + tl.arange(0, EB)
        tl.store(out + j, _nan_to_low((j.to(tl.float32) + offset) * step), mask=j < bins)
    tl.store(out + bins, _nan_to_low(_next_up(hi)))
    tl.store(approx_ptr + g * 2, step)
    tl.store(approx_ptr + g * 2 + 1, offset)


@triton.jit
def _ptr(desc, field, dtype: tl.constexpr):
    return tl.load(desc + field).to(tl.pointer_type(dtype))


@triton.jit(do_not_specialize=["G", "L"])
def summary_kernel(desc_ptr, scale_ptr, G, limit_ptr, L, STATS_AT: tl.constexpr, CHABS_AT: tl.constexpr,
                   BB: tl.constexpr, TP: tl.constexpr, SB: tl.constexpr, CBS: tl.constexpr, EB: tl.constexpr):
    """Program i: descriptor i (one row of one site call), whose key state starts at its `state` (float64)."""
    desc = desc_ptr + tl.program_id(0) * NF
    B, C = tl.load(desc + D_B).to(tl.int32), tl.load(desc + D_C).to(tl.int32)
    R, T, CPB = tl.load(desc + D_R).to(tl.int32), tl.load(desc + D_T).to(tl.int32), tl.load(desc + D_CPB).to(tl.int32)
    state_ptr = _ptr(desc, D_STATE, tl.float64)
    first, n_new = tl.load(desc + D_FIRST), tl.load(desc + D_N_NEW)
    mean, m2, sumsq, norms = _row_moments(_ptr(desc, D_PART, tl.float32), B, C, R, T, CPB, BB, TP)
    lo, hi = _channel_summary(_ptr(desc, D_CHMIN, tl.float32), _ptr(desc, D_CHMAX, tl.float32), state_ptr + CHABS_AT,
                              B, C, first, CHABS_AT >= 0, SB, CBS)
    if STATS_AT >= 0:
        _store_stats(state_ptr + STATS_AT, first, tl.load(desc + D_N_OLD), n_new, lo, hi, mean, m2, sumsq, norms)
    absmax = _nan_max(hi, -lo)
    site_range_ptr, new_site = _ptr(desc, D_SITE_RANGE, tl.float64), tl.load(desc + D_NEW_SITE)
    grid_ptr, edges_ptr = _ptr(desc, D_GRID, tl.int32), _ptr(desc, D_EDGES, tl.float32)
    approx_ptr, bounds_ptr = _ptr(desc, D_APPROX, tl.float32), _ptr(desc, D_BOUNDS, tl.float32)
    for g in range(G):
        _grid_edges(state_ptr, site_range_ptr, grid_ptr, scale_ptr, edges_ptr, approx_ptr, g, first, new_site, absmax, EB)
    sigma = tl.sqrt(m2 / n_new.to(tl.float64)).to(tl.float32)
    for i in range(L):
        factor = tl.load(limit_ptr + i * 2)
        limit = tl.where(tl.load(limit_ptr + i * 2 + 1) != 0, factor, sigma * factor)
        tl.store(bounds_ptr + i * 2, _nan_to_low(-limit))
        tl.store(bounds_ptr + i * 2 + 1, _nan_to_low(_next_up(limit)))


@triton.jit
def _positions(x, edges_ptr, step, offset, BINS: tl.constexpr):
    """#{edges <= x} in [0, BINS + 1] (NaN: BINS + 1): a guess from the bin width, then corrected. The
    width may be subnormal (automatic range of zeros), so x is divided by it rather than multiplied by 1/w."""
    guess = tl.floor(tl.math.div_rn(x, step) - offset) + 1.0
    guess = tl.where(guess != guess, BINS + 1.0, tl.minimum(tl.maximum(guess, 0.0), BINS + 1.0))
    p = guess.to(tl.int32)
    for _ in tl.static_range(2):
        below = tl.load(edges_ptr + tl.maximum(p - 1, 0))
        p = tl.where((p > 0) & (x < below), p - 1, p)
    for _ in tl.static_range(2):
        above = tl.load(edges_ptr + tl.minimum(p, BINS))
        p = tl.where((p <= BINS) & (x >= above), p + 1, p)
    return p


@triton.jit
def _add_grid(acc, below, above, x, mask, edges_ptr, approx_ptr, BINS: tl.constexpr, NB: tl.constexpr):
    """Positions 1..BINS into a histogram of NB = pow2(BINS) slots (tl.histogram's cost grows with its
    slots, so BINS = 1024 costs half of what BINS + 2 rounded up to 2048 would); 0 and BINS + 1 summed."""
    p = _positions(x, edges_ptr, tl.load(approx_ptr), tl.load(approx_ptr + 1), BINS)
    inside = mask & (p > 0) & (p <= BINS)
    below += tl.sum((mask & (p == 0)).to(tl.int32))
    above += tl.sum((mask & (p > BINS)).to(tl.int32))
    return acc + tl.histogram(tl.where(inside, p - 1, 0), NB, mask=inside), below, above


@triton.jit
def _store_grid(out_ptr, acc, below, above, BINS: tl.constexpr, NB: tl.constexpr):
    slots = tl.arange(0, NB)
    tl.store(out_ptr + 1 + slots, acc, mask=slots < BINS)
    tl.store(out_ptr, below)
    tl.store(out_ptr + BINS + 1, above)


@triton.jit(do_not_specialize=["S", "edges_a", "edges_b", "grid_a", "grid_b", "counts_a", "counts_b", "outliers_at"])
def count_kernel(desc_ptr, partial_ptr, S, edges_a, grid_a, counts_a, edges_b, grid_b, counts_b, outliers_at,
                 BINS_A: tl.constexpr, BINS_B: tl.constexpr, NB_A: tl.constexpr, NB_B: tl.constexpr,
                 LIMITS: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (p, i): blocks p, p + P, ... of descriptor i's row (P its `programs`; p >= P does nothing),
    counted for up to two grids (BINS_* = 0: none) and LIMITS outlier boundaries into scratch row
    partial_at + p of S count slots (grid: BINS + 2 positions at counts_*, hits at outliers_at)."""
    p = tl.program_id(0)
    desc = desc_ptr + tl.program_id(1) * NF
    programs = tl.load(desc + D_PROGRAMS).to(tl.int32)
    if p < programs:
        row = _ptr(desc, D_DATA, tl.float32)
        numel = tl.load(desc + D_N_NEW)
        edges_ptr, approx_ptr = _ptr(desc, D_EDGES, tl.float32), _ptr(desc, D_APPROX, tl.float32)
        bounds_ptr = _ptr(desc, D_BOUNDS, tl.float32)
        out_ptr = partial_ptr + (tl.load(desc + D_PARTIAL_AT) + p) * S
        acc_a = tl.zeros([NB_A], tl.int32)
        acc_b = tl.zeros([NB_B], tl.int32)
        below_a, above_a, below_b, above_b = 0, 0, 0, 0
        hits = tl.zeros([LP], tl.int32)
        lanes = tl.arange(0, LP)
        for start in range(p * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            x = tl.load(row + offs, mask=mask, other=0.0)
            if BINS_A > 0:
                acc_a, below_a, above_a = _add_grid(acc_a, below_a, above_a, x, mask, edges_ptr + edges_a,
                                                    approx_ptr + grid_a * 2, BINS_A, NB_A)
            if BINS_B > 0:
                acc_b, below_b, above_b = _add_grid(acc_b, below_b, above_b, x, mask, edges_ptr + edges_b,
                                                    approx_ptr + grid_b * 2, BINS_B, NB_B)
            for i in tl.static_range(LIMITS):
                low = tl.load(bounds_ptr + i * 2)
                high = tl.load(bounds_ptr + i * 2 + 1)
                hit = ((x < low) | (x >= high) | (x != x)) & mask
                hits += tl.where(lanes == i, tl.sum(hit.to(tl.int32)), 0)
        if BINS_A > 0:
            _store_grid(out_ptr + counts_a, acc_a, below_a, above_a, BINS_A, NB_A)
        if BINS_B > 0:
            _store_grid(out_ptr + counts_b, acc_b, below_b, above_b, BINS_B, NB_B)
        if LIMITS > 0:
            tl.store(out_ptr + outliers_at + lanes, hits, mask=lanes < LIMITS)


@triton.jit(do_not_specialize=["S"])
def add_counts_kernel(desc_ptr, partial_ptr, S, PB: tl.constexpr, SB: tl.constexpr):
    """Program (j, i): slots [j SB, (j + 1) SB) of descriptor i, summed over its count programs' scratch rows
    (int32: a row has fewer than 2^31 values) and added to the key state at its `counts` (float64)."""
    j = tl.program_id(0)
    desc = desc_ptr + tl.program_id(1) * NF
    programs, first_row = tl.load(desc + D_PROGRAMS), tl.load(desc + D_PARTIAL_AT)
    slots = j * SB + tl.arange(0, SB)
    total = tl.zeros([SB], tl.int32)
    for p0 in range(0, programs, PB):
        rows = p0 + tl.arange(0, PB)
        mask = (rows < programs)[:, None] & (slots < S)[None, :]
        at = (first_row + rows[:, None]) * S + slots[None, :]
        total += tl.sum(tl.load(partial_ptr + at, mask=mask, other=0), axis=0)
    state_ptr = _ptr(desc, D_COUNTS, tl.float64)
    old = tl.load(state_ptr + slots, mask=slots < S)
    tl.store(state_ptr + slots, old + total.to(tl.float64), mask=slots < S)
