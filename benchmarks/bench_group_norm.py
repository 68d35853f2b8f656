"""GroupNorm + swish on the fast path, alone: inductor's kernels for F.group_norm against
`modiff.models.ddim_unet.per_channel_group_norm` (statistics from per-channel sums), at every GroupNorm
shape of a model (default `fmnist-ddim`), each weighted by how often one network call meets it.

    python benchmarks/bench_group_norm.py --batch 1024 --out benchmarks/results/group_norm_h200_cases.json
    python benchmarks/bench_group_norm.py --model fmnist-ldm --batch 1024

Why: in the fp kernel table of `fmnist-ddim` at batch 1024 (`sampling_profile_h200.json`) inductor's
GroupNorm reductions move data at well under the H200's bandwidth. With channels_last and 32 groups of 64
channels, a group is 2 adjacent channels of each pixel, so a reduction over one group reads 4 bytes out of
every 128. Summing per channel over the pixels first reads whole rows of channels; the 32 group statistics
then come from the (batch, channels) sums. Both run compiled, bf16 channels_last in, float32 statistics,
bf16 out (what the next convolution reads), with the time-embedding add where it precedes the GroupNorm (a
ResBlock's second). Printed per case: microseconds, the bandwidth floor (read once, write once) and the
largest difference between the two outputs; then the microseconds per network call of each formulation
and of the faster one per case. CUDA only.
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import cuda_kernel_args, device_us  # noqa: E402

from modiff.models.ddim_unet import per_channel_group_norm  # noqa: E402
from modiff.models.registry import load_model  # noqa: E402

GROUPS, EPS = 32, 1e-6
HBM_BYTES_PER_US = 4.8e6  # H200 datasheet, 4.8 TB/s
AFTER_TIME_ADD = ("norm2", "out_layers.0")  # a ResBlock's second GroupNorm: DDIM UNet, CompVis UNet
Case = tuple[int, int, bool]  # channels, resolution, time-embedding add before the GroupNorm


def group_norm_cases(model: str) -> collections.Counter[Case]:
    """How often one call of the model's network meets each GroupNorm case (forward hooks, batch 1, CPU)."""
    denoiser = load_model(model)
    net = denoiser.net
    cases: collections.Counter[Case] = collections.Counter()
    hooks = [module.register_forward_hook(
        lambda module, inputs, _, after_add=name.endswith(AFTER_TIME_ADD): cases.update(
            [(inputs[0].shape[1], inputs[0].shape[-1], after_add)]))
        for name, module in net.named_modules() if isinstance(module, torch.nn.GroupNorm)]
    with torch.no_grad():
        net(torch.zeros(1, *denoiser.sample_shape), torch.zeros(1, dtype=torch.long))
    for hook in hooks:
        hook.remove()
    return cases


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
    args = cuda_kernel_args(__doc__, "bench_group_norm.py", batch=1024,
                            more=lambda parser: parser.add_argument("--model", default="fmnist-ddim"))
    device, rows, per_call = torch.device("cuda"), [], collections.Counter()
    cases = group_norm_cases(args.model)
    for (channels, res, time_add), calls in sorted(cases.items()):
        x = torch.randn(args.batch, channels, res, res, device=device).bfloat16().to(memory_format=torch.channels_last)
        weight, bias = torch.randn(channels, device=device), torch.randn(channels, device=device)
        temb = torch.randn(args.batch, channels, device=device) if time_add else None
        # A fresh compilation per case: one function met at many shapes would pass dynamo's recompile limit
        # of 8, beyond which it runs the function eagerly
        torch._dynamo.reset()
        compiled = {name: torch.compile(fn, dynamic=False) for name, fn in FORMULATIONS.items()}
        floor_us = 2 * x.numel() * x.element_size() / HBM_BYTES_PER_US
        outputs, times = {}, {}
        for name, fn in compiled.items():
            outputs[name] = fn(x, weight, bias, temb)
            times[name] = device_us(lambda: fn(x, weight, bias, temb))
            rows.append({"shape": f"{channels}x{res}x{res}", "time_add": time_add, "calls_per_network_call": calls,
                         "formulation": name, "us": round(times[name], 1), "floor_us": round(floor_us, 1),
                         "over_floor": round(times[name] / floor_us, 2)})
            print(json.dumps(rows[-1]), flush=True)
        first, second = outputs.values()
        rows[-1]["max_abs_difference"] = float((first.float() - second.float()).abs().max())
        for name, us in times.items():
            per_call[name] += calls * us
        per_call["faster per case"] += calls * min(times.values())
    totals = {name: round(us, 1) for name, us in per_call.items()}
    print(json.dumps({"us_per_network_call": totals}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "model": args.model, "batch": args.batch, "rows": rows,
                                              "us_per_network_call": totals}, indent=1) + "\n")


if __name__ == "__main__":
    main()
