"""The real backend's implicit-GEMM convolution alone, per layer shape, against cuDNN's bf16 convolution.

    python benchmarks/bench_real_gemm.py --batch 512 --out benchmarks/results/real_gemm_h200.json
    python benchmarks/bench_real_gemm.py --batch 512 --tilings-out modiff/quant/kernels/gemm_tilings.json

For each 3x3 convolution shape of the CIFAR-10 DDIM UNet (and the 64-channel one of `fmnist-ddim`) at the given
batch: microseconds and TFLOP/s of F.conv2d in bf16, channels_last (what the fast path runs), and of the
Triton GEMM (INT8 and FP8 codes, and INT8 codes against 4-bit weights (W4A8); direct epilogue) under the
heuristic tile choice ("default") and each of
`real.CANDIDATE_TILINGS`, so a reader sees whether the kernel or the tiling is what keeps the real path behind.
Each time is the device time of 20 calls replayed as one CUDA graph (what the fast path runs), the median of
five trials, all five recorded (`trials_us`); `eager_us` is the same timed on eager launches, host included.
With --tilings-out, the fastest tiling of each shape, format and row scale, where its median beats the
heuristic's by more than MARGIN, is written as the table the kernels read (`real.measured_tilings`). CUDA only.
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
MARGIN = 0.10  # a measured tiling replaces the heuristic only if its median is this much faster (timing noise)
FORMATS = {"int": (False, False), "fp8_e4m3": (True, False), "w4a8": (False, True)}  # label -> (fp8, 4-bit weights)


def choose_tilings(rows: list[dict], margin: float = MARGIN) -> dict[str, list[int]]:
    """From this benchmark's rows: per shape, format and row scale (`real.tiling_key`), the candidate tiling with
    the lowest median time, where it beats the heuristic's ("candidate" None) by more than ``margin`` (relative)."""
    timed = [r for r in rows if "key" in r and "us" in r]
    chosen = {}
    for key in dict.fromkeys(r["key"] for r in timed):
        default = [r["us"] for r in timed if r["key"] == key and r["candidate"] is None]
        candidates = [r for r in timed if r["key"] == key and r["candidate"] is not None]
        if default and candidates:
            best = min(candidates, key=lambda r: r["us"])
            if best["us"] < (1 - margin) * default[0]:
                chosen[key] = list(best["candidate"])
    return chosen


def _tflops(flops: float, us: float) -> float:
    return round(flops / us / 1e6, 1)


def main() -> None:
    args = cuda_kernel_args(__doc__, "bench_real_gemm.py", batch=512, more=lambda parser: parser.add_argument(
        "--tilings-out", help="write the per-shape tilings that beat the heuristic (JSON, real.TILINGS_FILE's format)"))
    device = torch.device("cuda")
    rows = []
    for name, c, res in SHAPES:
        flops = 2.0 * args.batch * res * res * c * c * 9
        x = torch.randn(args.batch, c, res, res, device=device).to(memory_format=torch.channels_last)
        weight = torch.randn(c, c, 3, 3, device=device)
        x16, w16 = x.bfloat16(), weight.bfloat16().to(memory_format=torch.channels_last)
        us = device_us(lambda: F.conv2d(x16, w16, padding=1), graph=True)
        eager_us = device_us(lambda: F.conv2d(x16, w16, padding=1))
        rows.append({"shape": name, "kernel": "cudnn bf16", "us": round(us, 1), "tflops": _tflops(flops, us),
                     "eager_us": round(eager_us, 1)})
        print(json.dumps(rows[-1]), flush=True)
        geometry = [args.batch, res, res, c, res, res, c, 3, 3, 1, 1, 1, 1]
        scales = torch.ones(args.batch, device=device)
        w_scale = torch.ones(c, device=device)
        for fmt, (fp8, int4) in FORMATS.items():
            codes = torch.randint(-7, 8, x.shape, device=device).float()
            codes = codes.permute(0, 2, 3, 1).contiguous()  # NHWC-dense, as the layers hand it over
            codes = codes.to(torch.float8_e4m3fn).view(torch.uint8) if fp8 else codes.to(torch.int8)
            weight_codes = torch.randint(-7, 8, weight.shape, device=device).float()
            if int4:
                packed, offset = real.pack_weight_int4(weight_codes, torch.zeros(c, device=device), qmin=-7)
            else:
                packed, offset = real.pack_weight(weight_codes, fmt), None
            m = args.batch * res * res
            heuristic = real.heuristic_blocks(m, c, c)
            for tiling in [None, *real.CANDIDATE_TILINGS]:
                blocks = heuristic if tiling is None else dict(zip(real.TILING_KEYS, tiling))
                label = f"default {tuple(heuristic.values())}" if tiling is None else str(tiling)
                where = {"shape": name, "kernel": f"triton {fmt}", "tiling": label,
                         "key": real.tiling_key(fp8, 9, c, c, m, int4), "candidate": tiling}

                def gemm() -> torch.Tensor:
                    return real._gemm(codes, scales, packed, w_scale, None, None, geometry, torch.bfloat16, blocks,
                                      offset)

                try:
                    trials = device_us_trials(gemm, graph=True)
                    us = statistics.median(trials)
                    row = {**where, "us": round(us, 1), "tflops": _tflops(flops, us),
                           "trials_us": [round(t, 1) for t in trials], "eager_us": round(device_us(gemm), 1)}
                except Exception as err:  # a tiling the compiler or the GPU refuses (shared memory)
                    row = {**where, "error": str(err)[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "batch": args.batch,
                                              "rows": rows}, indent=1))
    if args.tilings_out:
        Path(args.tilings_out).write_text(json.dumps(
            {"measured": {"device": torch.cuda.get_device_name(), "batch": args.batch, "margin": MARGIN,
                          "by": "benchmarks/bench_real_gemm.py"}, "tilings": choose_tilings(rows)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
