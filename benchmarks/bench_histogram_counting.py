"""How fast a GPU counts values into fixed bins, measured side by side in one run: the cost under the
fused recorder's histograms and quantiles (`modiff.record.engines.fused.triton_kernels.count_kernel`).

    python benchmarks/bench_histogram_counting.py --out benchmarks/results/histogram_counting_h200.json

16.7 M float32 values (one 256 x 256 x 16 x 16 activation) drawn N(0, 1) ("gauss") or N(0, 0.003^2)
("narrow": nearly all values in a few bins, as temporal differences late in sampling) over the range
[-5, 5], counted into 256, 1024 and 2048 bins by: `tl.histogram` (per program in registers, the fused
recorder's method), one-hot matrix products on the tensor cores ("dot": bin = row * COLS + col counted as
one-hot(row)^T @ one-hot(col), int8 or bfloat16, blocks of 256 or 1,024 values), `tl.atomic_add` into a
private copy per program ("atomic_private") and into one shared copy ("atomic_shared"), and shared-memory
atomics in CUDA C compiled at run time by NVRTC (`torch.cuda._compile_kernel`; "smem": one or several
copies per block, warps spread over them, which Triton cannot express); "read" is one pass that only sums
the values (the bandwidth floor). Every method's
counts are checked against `torch.bincount`. Also the host time of one Triton launch with 5 and with 40
arguments. Needs CUDA and Triton.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
import triton
import triton.language as tl

from profiling import device_us


@triton.jit
def read_kernel(x_ptr, n, out_ptr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(p * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + p, tl.sum(acc))


@triton.jit
def hist_tl_kernel(x_ptr, n, out_ptr, lo, inv, NB: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    acc = tl.zeros([NB], tl.int32)
    for start in range(p * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        acc += tl.histogram(tl.minimum(tl.maximum(((x - lo) * inv).to(tl.int32), 0), NB - 1), NB, mask=mask)
    tl.store(out_ptr + p * NB + tl.arange(0, NB), acc)


@triton.jit
def hist_dot_kernel(x_ptr, n, out_ptr, lo, inv, NB: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr,
                    INT8: tl.constexpr):
    """Bin b = row * COLS + col counted as one-hot(row)^T @ one-hot(col) on the tensor cores, accumulated
    exactly (int8 -> int32, or bfloat16 -> float32 below 2^24 counts per program)."""
    p = tl.program_id(0)
    rows = tl.arange(0, NB // COLS)
    cols = tl.arange(0, COLS)
    acc = tl.zeros([NB // COLS, COLS], tl.int32 if INT8 else tl.float32)
    one_hot = tl.int8 if INT8 else tl.bfloat16
    for start in range(p * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        b = tl.minimum(tl.maximum(((x - lo) * inv).to(tl.int32), 0), NB - 1)
        b = tl.where(mask, b, -COLS)  # row -1 matches no row
        row_hot = (b[None, :] // COLS == rows[:, None]).to(one_hot)
        col_hot = (b[:, None] % COLS == cols[None, :]).to(one_hot)
        acc = tl.dot(row_hot, col_hot, acc, out_dtype=acc.dtype)
    out = out_ptr + p * NB + rows[:, None] * COLS + cols[None, :]
    tl.store(out, acc.to(tl.int32))


@triton.jit
def hist_atomic_kernel(x_ptr, n, out_ptr, lo, inv, NB: tl.constexpr, BLOCK: tl.constexpr, PRIVATE: tl.constexpr):
    p = tl.program_id(0)
    base = out_ptr + (p * NB if PRIVATE else 0)
    for start in range(p * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        b = tl.minimum(tl.maximum(((x - lo) * inv).to(tl.int32), 0), NB - 1)
        tl.atomic_add(base + b, 1, mask=mask, sem="relaxed")


@triton.jit
def forty_args_kernel(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t, u, v, w, x, y, z, a2, b2, c2, d2,
                      e2, f2, g2, h2, i2, j2, k2, l2, m2, n2, K: tl.constexpr):
    tl.store(a + tl.program_id(0), b)


@triton.jit
def five_args_kernel(a, b, c, d, K: tl.constexpr):
    tl.store(a + tl.program_id(0), b)


SMEM_SOURCE = r"""
extern "C" __global__ void smem_histogram(const float* __restrict__ x, int n, double lo_arg, double inv_arg,
                                          int bins, int copies, unsigned int* __restrict__ out) {
    extern __shared__ unsigned int counts[];  // copies x bins
    const float lo = (float)lo_arg, inv = (float)inv_arg;  // torch computes (x - lo) * inv in float32 too
    for (int i = threadIdx.x; i < copies * bins; i += blockDim.x) counts[i] = 0;
    __syncthreads();
    unsigned int* mine = counts + (threadIdx.x / 32) % copies * bins;
    const int stride = gridDim.x * blockDim.x;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n / 4; i += stride) {
        const float4 v = x4[i];
        const float vs[4] = {v.x, v.y, v.z, v.w};
        for (int k = 0; k < 4; ++k) {
            atomicAdd(mine + min(max((int)((vs[k] - lo) * inv), 0), bins - 1), 1u);
        }
    }
    for (int i = n / 4 * 4 + blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        atomicAdd(mine + min(max((int)((x[i] - lo) * inv), 0), bins - 1), 1u);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < bins; j += blockDim.x) {
        unsigned int total = 0;
        for (int c = 0; c < copies; ++c) total += counts[c * bins + j];
        if (total) atomicAdd(out + j, total);
    }
}
"""
SMEM_THREADS = 512
SMEM_BYTES = 48 * 1024  # without opting in to more shared memory per block


def _smem_counting(x: torch.Tensor, programs: int, lo: float, inv: float, bins: int, expected: torch.Tensor,
                   row: dict[str, float]) -> None:
    kernel = torch.cuda._compile_kernel(SMEM_SOURCE, "smem_histogram")
    out = torch.zeros(bins, dtype=torch.int32, device=x.device)
    for copies in (1, 4, 8, 16):
        if copies * bins * 4 > SMEM_BYTES:
            continue
        for blocks in (programs, 4 * programs):
            def launch() -> None:
                kernel(grid=(blocks, 1, 1), block=(SMEM_THREADS, 1, 1), shared_mem=copies * bins * 4,
                       args=[x, x.numel(), lo, inv, bins, copies, out])
            out.zero_()
            launch()
            assert torch.equal(out, expected), f"shared-memory atomics ({copies} copies, {blocks} blocks)"
            row[f"smem_{copies}copies_{blocks}blocks_{bins}_us"] = device_us(launch)


def _host_us(fn: Callable[[], object], repeats: int = 2000) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / repeats * 1e6


def _counting(x: torch.Tensor, programs: int, lo: float = -5.0, hi: float = 5.0) -> dict[str, float]:
    n = x.numel()
    row: dict[str, float] = {"read_us": device_us(
        lambda: read_kernel[(2 * programs,)](x, n, torch.empty(2 * programs, device=x.device), BLOCK=1024))}
    for bins in (256, 1024, 2048):
        inv = bins / (hi - lo)
        expected = torch.bincount(((x - lo) * inv).to(torch.int32).clamp(0, bins - 1), minlength=bins).int()
        out = torch.zeros(programs * bins, dtype=torch.int32, device=x.device)
        hist_tl_kernel[(programs,)](x, n, out, lo, inv, NB=bins, BLOCK=1024)
        assert torch.equal(out.view(programs, bins).sum(0), expected), "tl.histogram"
        row[f"tl_hist_{bins}_us"] = device_us(lambda: hist_tl_kernel[(programs,)](x, n, out, lo, inv, NB=bins, BLOCK=1024))
        for int8 in (True, False):
            for block in (256, 1024):
                kwargs = dict(NB=bins, COLS=16 if bins <= 256 else 32, BLOCK=block, INT8=int8)
                out.zero_()
                hist_dot_kernel[(programs,)](x, n, out, lo, inv, **kwargs)
                assert torch.equal(out.view(programs, bins).sum(0), expected), f"one-hot dot {kwargs}"
                row[f"dot_{'int8' if int8 else 'bf16'}_{block}_{bins}_us"] = device_us(
                    lambda: hist_dot_kernel[(programs,)](x, n, out, lo, inv, **kwargs))
        for private in (True, False):
            out.zero_()
            hist_atomic_kernel[(programs,)](x, n, out, lo, inv, NB=bins, BLOCK=1024, PRIVATE=private)
            counts = out.view(programs, bins).sum(0) if private else out[:bins]
            assert torch.equal(counts, expected), f"atomic_add (private={private})"
            row[f"atomic_{'private' if private else 'shared'}_{bins}_us"] = device_us(
                lambda: hist_atomic_kernel[(programs,)](x, n, out, lo, inv, NB=bins, BLOCK=1024, PRIVATE=private))
        _smem_counting(x, programs, lo, inv, bins, expected, row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    device = torch.device("cuda")
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    for label, sigma in (("gauss", 1.0), ("narrow", 0.003)):
        x = torch.randn(256 * 256 * 16 * 16, device=device, generator=generator) * sigma
        rows.append({"data": label, "values": x.numel(), **_counting(x, programs)})
        print(json.dumps(rows[-1]), flush=True)
    buf = torch.zeros(1024, device=device)
    rows.append({"launch_host_us_5_args": _host_us(lambda: five_args_kernel[(1,)](buf, 1.0, 3, 4, K=1)),
                 "launch_host_us_40_args": _host_us(lambda: forty_args_kernel[(1,)](buf, *([1.0] + [3] * 38), K=1))})
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
