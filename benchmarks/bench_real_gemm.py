"""The real backend's implicit-GEMM convolution alone, per layer shape, against cuDNN's bf16 convolution.

    python benchmarks/bench_real_gemm.py --batch 512 --out benchmarks/results/real_gemm_h200.json

For each 3x3 convolution shape of the CIFAR-10 DDIM UNet (and the 64-channel one of `fmnist-ddim`) at the given
batch: microseconds and TFLOP/s of F.conv2d in bf16, channels_last (what the fast path runs), and of the
Triton GEMM (INT8 and FP8 codes, direct epilogue) under the default tile choice and a few other tilings, so a
reader sees whether the kernel or the tiling is what keeps the real path behind. Each time is the median of five
trials, all five recorded (`trials_us`). CUDA only.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import cuda_kernel_args, device_us, device_us_trials  # noqa: E402

from modiff.quant.kernels import real  # noqa: E402

# (name, channels in = out, resolution): the 3x3 convolutions that carry most of a UNet step's work
SHAPES = [("cifar 32x32 c128", 128, 32), ("cifar 16x16 c256", 256, 16), ("cifar 8x8 c256", 256, 8),
          ("fmnist 32x32 c64", 64, 32)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILINGS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
           (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4)]


def _tflops(flops: float, us: float) -> float:
    return round(flops / us / 1e6, 1)


def main() -> None:
    args = cuda_kernel_args(__doc__, "bench_real_gemm.py", batch=512)
    device = torch.device("cuda")
    rows = []
    for name, c, res in SHAPES:
        flops = 2.0 * args.batch * res * res * c * c * 9
        x = torch.randn(args.batch, c, res, res, device=device).to(memory_format=torch.channels_last)
        weight = torch.randn(c, c, 3, 3, device=device)
        x16, w16 = x.bfloat16(), weight.bfloat16().to(memory_format=torch.channels_last)
        us = device_us(lambda: F.conv2d(x16, w16, padding=1))
        rows.append({"shape": name, "kernel": "cudnn bf16", "us": round(us, 1), "tflops": _tflops(flops, us)})
        print(json.dumps(rows[-1]), flush=True)
        geometry = [args.batch, res, res, c, res, res, c, 3, 3, 1, 1, 1, 1]
        scales = torch.ones(args.batch, device=device)
        w_scale = torch.ones(c, device=device)
        for fmt in ("int", "fp8_e4m3"):
            codes = torch.randint(-8, 8, x.shape, device=device).float()
            codes = codes.permute(0, 2, 3, 1).contiguous()  # NHWC-dense, as the layers hand it over
            codes = codes.to(torch.float8_e4m3fn).view(torch.uint8) if fmt == "fp8_e4m3" else codes.to(torch.int8)
            packed = real.pack_weight(torch.randint(-8, 8, weight.shape, device=device).float(), fmt)
            m = args.batch * res * res
            for tiling in [None, *TILINGS]:
                blocks = None if tiling is None else dict(zip(
                    ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), tiling))
                label = "default " + str(tuple(real._gemm_blocks(m, c, c).values())) if tiling is None else str(tiling)
                try:
                    trials = device_us_trials(lambda: real._gemm(codes, scales, packed, w_scale, None, None, geometry,
                                                                 torch.bfloat16, blocks))
                    us = statistics.median(trials)
                    row = {"shape": name, "kernel": f"triton {fmt}", "tiling": label, "us": round(us, 1),
                           "tflops": _tflops(flops, us), "trials_us": [round(t, 1) for t in trials]}
                except Exception as err:  # a tiling the compiler or the GPU refuses (shared memory)
                    row = {"shape": name, "kernel": f"triton {fmt}", "tiling": label, "error": str(err)[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
