"""The fused recorder's count pass in CUDA C: histograms in shared memory, compiled at run time by NVRTC.

Triton has no shared-memory atomics, and its `tl.histogram` counts several times slower than they do
(benchmarks/README.md, "Counting values into bins on a GPU"). This kernel is a drop-in for
`triton_kernels.count_kernel`: the same
descriptors, the same arguments, the same int32 scratch row per (descriptor, program), the same counts
(its cheaper guess of a value's bin is corrected against the edges, as Triton's is).
A block is one program: it loads the grids' edges into shared memory, counts every value of its part of
the row into shared bins (positions #{edges <= x}: the arithmetic guess from the bin width, corrected
against the edges, as in `triton_kernels._positions`), counts outlier hits in registers, and stores its row.

`count_kernel_for(device)` compiles once per device (`torch.cuda._compile_kernel`, NVRTC); it returns None
where that is unavailable, and the fused engine then counts with Triton (as it does for grids whose
shared memory would exceed 48 KB, or more than MAX_LIMITS outlier boundaries).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch

from modiff.record.engines.fused.layout import DESCRIPTOR

__all__ = ["MAX_LIMITS", "SHARED_LIMIT", "count_kernel_for", "fits", "launch_count", "shared_bytes", "source"]

MAX_LIMITS = 8  # outlier boundaries per launch held in registers; more take the Triton kernel
THREADS = 512
_FIELDS = ("programs", "data", "n_new", "edges", "approx", "bounds", "partial_at")

SOURCE = r"""
#define NF %(NF)d
%(FIELDS)s
#define MAX_LIMITS %(MAX_LIMITS)d

// #{edges <= x} in [0, bins + 1] (NaN: bins + 1). As kernels._positions: a guess from the bin width, then
// corrected against the edges by up to two positions either way (any guess within two of the position
// gives the exact count). The guess multiplies by 1 / width where that is finite (a division costs
// several times more); a subnormal width divides. The edges are read only in the direction that moves.
__device__ __forceinline__ int position(float x, const float* e, float step, float inv, float offset, int bins) {
    const float scaled = isfinite(inv) ? x * inv : __fdiv_rn(x, step);
    float guess = floorf(scaled - offset) + 1.0f;
    guess = guess != guess ? (float)(bins + 1) : fminf(fmaxf(guess, 0.0f), (float)(bins + 1));
    int p = (int)guess;
    if (p > 0 && x < e[p - 1]) {
        --p;
        if (p > 0 && x < e[p - 1]) --p;
    } else if (p <= bins && x >= e[p]) {
        ++p;
        if (p <= bins && x >= e[p]) ++p;
    }
    return p;
}

struct Counter {
    const float *ea, *eb;
    unsigned int *ca, *cb;
    float step_a, inv_a, offset_a, step_b, inv_b, offset_b;
    int bins_a, bins_b, limits;
    float low[MAX_LIMITS], high[MAX_LIMITS];
    unsigned int hits[MAX_LIMITS];

    __device__ __forceinline__ void add(float x) {
        if (bins_a) atomicAdd(ca + position(x, ea, step_a, inv_a, offset_a, bins_a), 1u);
        if (bins_b) atomicAdd(cb + position(x, eb, step_b, inv_b, offset_b, bins_b), 1u);
#pragma unroll
        for (int i = 0; i < MAX_LIMITS; ++i) {
            if (i < limits) hits[i] += (x < low[i]) | (x >= high[i]) | (x != x);
        }
    }
};

extern "C" __global__ void __launch_bounds__(%(THREADS)d) count_shared(
        const long long* __restrict__ desc, int* __restrict__ partial, int S,
        int edges_a, int grid_a, int counts_a, int edges_b, int grid_b, int counts_b, int outliers_at,
        int bins_a, int bins_b, int limits) {
    const long long* d = desc + (long long)blockIdx.y * NF;
    const int programs = (int)d[D_PROGRAMS];
    const int p = blockIdx.x;
    if (p >= programs) return;
    const float* row = (const float*)d[D_DATA];
    const long long numel = d[D_N_NEW];
    const float* edges = (const float*)d[D_EDGES];
    const float* approx = (const float*)d[D_APPROX];
    const float* bounds = (const float*)d[D_BOUNDS];
    int* out = partial + (d[D_PARTIAL_AT] + p) * (long long)S;

    // shared: edges A (bins_a + 1) | edges B | positions A (bins_a + 2) | positions B | hits (limits)
    extern __shared__ float shared[];
    const int ne_a = bins_a ? bins_a + 1 : 0, ne_b = bins_b ? bins_b + 1 : 0;
    const int np_a = bins_a ? bins_a + 2 : 0, np_b = bins_b ? bins_b + 2 : 0;
    Counter c;
    c.ea = shared;
    c.eb = shared + ne_a;
    c.ca = (unsigned int*)(shared + ne_a + ne_b);
    c.cb = c.ca + np_a;
    unsigned int* hits = c.cb + np_b;
    for (int j = threadIdx.x; j < ne_a; j += blockDim.x) shared[j] = edges[edges_a + j];
    for (int j = threadIdx.x; j < ne_b; j += blockDim.x) shared[ne_a + j] = edges[edges_b + j];
    for (int j = threadIdx.x; j < np_a + np_b + limits; j += blockDim.x) c.ca[j] = 0u;
    c.bins_a = bins_a;
    c.bins_b = bins_b;
    c.limits = limits;
    c.step_a = bins_a ? approx[grid_a * 2] : 1.0f;
    c.offset_a = bins_a ? approx[grid_a * 2 + 1] : 0.0f;
    c.step_b = bins_b ? approx[grid_b * 2] : 1.0f;
    c.inv_a = 1.0f / c.step_a;
    c.inv_b = 1.0f / c.step_b;
    c.offset_b = bins_b ? approx[grid_b * 2 + 1] : 0.0f;
#pragma unroll
    for (int i = 0; i < MAX_LIMITS; ++i) {
        c.low[i] = i < limits ? bounds[i * 2] : 0.0f;
        c.high[i] = i < limits ? bounds[i * 2 + 1] : 0.0f;
        c.hits[i] = 0u;
    }
    __syncthreads();

    // program p counts one contiguous part of the row (a multiple of 4 values: aligned float4 loads)
    const long long part = ((numel + programs - 1) / programs + 3) / 4 * 4;
    const long long start = p * part, len = max(min(part, numel - start), 0LL);
    const float* base = row + start;
    const long long quads = ((size_t)base & 15) == 0 ? len / 4 : 0;
    const float4* base4 = (const float4*)base;
    long long i = threadIdx.x;
    for (; i + blockDim.x < quads; i += 2 * blockDim.x) {  // two loads in flight before counting
        const float4 u = base4[i], v = base4[i + blockDim.x];
        c.add(u.x); c.add(u.y); c.add(u.z); c.add(u.w);
        c.add(v.x); c.add(v.y); c.add(v.z); c.add(v.w);
    }
    if (i < quads) {
        const float4 u = base4[i];
        c.add(u.x); c.add(u.y); c.add(u.z); c.add(u.w);
    }
    for (long long j = quads * 4 + threadIdx.x; j < len; j += blockDim.x) c.add(base[j]);

#pragma unroll
    for (int k = 0; k < MAX_LIMITS; ++k) {
        if (k < limits) {
            unsigned int total = c.hits[k];
#pragma unroll
            for (int lane = 16; lane > 0; lane /= 2) total += __shfl_xor_sync(0xffffffffu, total, lane);
            if ((threadIdx.x & 31) == 0 && total) atomicAdd(hits + k, total);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < np_a; j += blockDim.x) out[counts_a + j] = (int)c.ca[j];
    for (int j = threadIdx.x; j < np_b; j += blockDim.x) out[counts_b + j] = (int)c.cb[j];
    for (int j = threadIdx.x; j < limits; j += blockDim.x) out[outliers_at + j] = (int)hits[j];
}
"""


def source() -> str:
    """The kernel's CUDA C, with the descriptor's field indices of `layout.DESCRIPTOR`."""
    fields = "\n".join(f"#define D_{f.upper()} {DESCRIPTOR.index(f)}" for f in _FIELDS)
    return SOURCE % {"NF": len(DESCRIPTOR), "FIELDS": fields, "MAX_LIMITS": MAX_LIMITS, "THREADS": THREADS}


@functools.lru_cache(maxsize=None)
def _compiled(device_index: int) -> Optional[Callable[..., None]]:
    compile_kernel = getattr(torch.cuda, "compile_kernel", None) or getattr(torch.cuda, "_compile_kernel", None)
    if compile_kernel is None:
        return None
    try:
        with torch.cuda.device(device_index):
            return compile_kernel(source(), "count_shared")
    except Exception as error:  # NVRTC missing or failing: the Triton kernel counts instead
        warnings.warn(f"the shared-memory count kernel did not compile ({error}); counting with Triton", RuntimeWarning)
        return None


def count_kernel_for(device: torch.device) -> Optional[Callable[..., None]]:
    """The compiled kernel for a CUDA device, or None (not CUDA, no NVRTC)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _compiled(device.index if device.index is not None else torch.cuda.current_device())


SHARED_LIMIT = 48 * 1024  # bytes per block without opting in to more


def fits(bins: tuple[int, int], limits: int) -> bool:
    return limits <= MAX_LIMITS and shared_bytes(*bins, limits) <= SHARED_LIMIT


def shared_bytes(bins_a: int, bins_b: int, limits: int) -> int:
    edges = sum(b + 1 for b in (bins_a, bins_b) if b)
    positions = sum(b + 2 for b in (bins_a, bins_b) if b)
    return 4 * (edges + positions + limits)


def launch_count(kernel: Callable[..., None], desc: torch.Tensor, partials: torch.Tensor, slots: int,
                 programs: int, descriptors: int, edges: tuple[int, int], grids: tuple[int, int],
                 counts: tuple[int, int], outliers_at: int, bins: tuple[int, int], limits: int) -> None:
    """One launch over (programs, descriptors), with the arguments of `kernels.count_kernel`, on the current
    device and stream (the caller makes it the tensors' device: its context holds the compiled kernel)."""
    kernel(grid=(programs, descriptors, 1), block=(THREADS, 1, 1), shared_mem=shared_bytes(*bins, limits),
           args=[desc, partials, slots, edges[0], grids[0], counts[0], edges[1], grids[1], counts[1], outliers_at,
                 bins[0], bins[1], limits])
