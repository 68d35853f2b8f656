"""GroupNorm + swish on the fast path, alone: inductor's kernels for F.group_norm against
`modiff.models.ddim_unet.per_channel_group_norm` (statistics from per-channel sums), at the shapes of
`fmnist-ddim`'s ResBlocks.

    python benchmarks/bench_group_norm.py --batch 1024 --out benchmarks/results/group_norm_h200.json

Why: in the fp kernel table of `fmnist-ddim` at batch 1024 (`sampling_profile_h200.json`) inductor's
GroupNorm reductions move data at well under the H200's bandwidth. With channels_last and 32 groups of 64
channels, a group is 2 adjacent channels of each pixel, so a reduction over one group reads 4 bytes out of
every 128. Summing per channel over the pixels first reads whole rows of channels; the 32 group statistics
then come from the (batch, channels) sums. Both run compiled, bf16 channels_last in, float32 statistics,
bf16 out (what the next convolution reads), with and without the time-embedding add that precedes a
ResBlock's second GroupNorm. Printed per shape: microseconds, the bandwidth floor (read once, write once)
and the largest difference between the two outputs. CUDA only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import cuda_kernel_args, device_us  # noqa: E402

from modiff.models.ddim_unet import per_channel_group_norm  # noqa: E402

GROUPS, EPS = 32, 1e-6
HBM_BYTES_PER_US = 4.8e6  # H200 datasheet, 4.8 TB/s
# (channels, resolution) of the GroupNorms in fmnist-ddim (ch 64, ch_mult 1, 2, 2, 2; up path concatenations)
SHAPES = [(64, 32), (128, 16), (128, 8), (128, 4), (192, 32), (256, 16), (256, 8)]


def aten_group_norm_swish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          temb: Optional[torch.Tensor]) -> torch.Tensor:
    h = x.float() if temb is None else x.float() + temb[:, :, None, None]
    return F.silu(F.group_norm(h, GROUPS, weight, bias, EPS)).bfloat16()


def channel_sum_group_norm_swish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 temb: Optional[torch.Tensor]) -> torch.Tensor:
    h = x.float() if temb is None else x.float() + temb[:, :, None, None]
    return F.silu(per_channel_group_norm(h, GROUPS, weight, bias, EPS)).bfloat16()


FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "aten group_norm": aten_group_norm_swish, "per-channel sums": channel_sum_group_norm_swish}


def main() -> None:
    args = cuda_kernel_args(__doc__, "bench_group_norm.py", batch=1024)
    device, rows = torch.device("cuda"), []
    for channels, res in SHAPES:
        x = torch.randn(args.batch, channels, res, res, device=device).bfloat16().to(memory_format=torch.channels_last)
        weight, bias = torch.randn(channels, device=device), torch.randn(channels, device=device)
        for temb in (None, torch.randn(args.batch, channels, device=device)):
            # A fresh compilation per case: 7 shapes x 2 cases are 14 graphs per function, past dynamo's recompile
            # limit of 8, beyond which it would run the function eagerly
            torch._dynamo.reset()
            compiled = {name: torch.compile(fn, dynamic=False) for name, fn in FORMULATIONS.items()}
            floor_us = 2 * x.numel() * x.element_size() / HBM_BYTES_PER_US
            outputs = {}
            for name, fn in compiled.items():
                outputs[name] = fn(x, weight, bias, temb)
                us = device_us(lambda: fn(x, weight, bias, temb))
                rows.append({"shape": f"{channels}x{res}x{res}", "time_add": temb is not None, "formulation": name,
                             "us": round(us, 1), "floor_us": round(floor_us, 1), "over_floor": round(us / floor_us, 2)})
                print(json.dumps(rows[-1]), flush=True)
            first, second = outputs.values()
            rows[-1]["max_abs_difference"] = float((first.float() - second.float()).abs().max())
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "batch": args.batch, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
