"""Device time of the fused recorder's scan kernel per sampling step, by chunk size and warps, beside a
torch kernel that moves the same bytes (read a_s and a_{s-1}, write one tensor): the bandwidth floor.

    python benchmarks/bench_record_scan.py --out benchmarks/results/record_scan_h200.json

The site shapes are those of every Conv/Linear input of the CIFAR-10 UNet at `--batch` (one forward,
hooks), each timed once on random data and weighted by its number of sites. `--configs` lists
(values per chunk, warps); the recorder uses `modiff.record.engines.fused.engine._TILE` values with 4 warps. Rows with
and without storing the difference (it is stored only when a histogram or outlier count follows).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig
from modiff.record.engines.fused import triton_kernels as kernels
from modiff.record.engines.fused.engine import _pow2

from profiling import device_us


def site_shapes() -> Counter:
    """Per-sample input shape of every Conv/Linear of the CIFAR-10 UNet -> number of sites."""
    net = DDIMUNet(DDIMUNetConfig(ch=128, in_channels=3, out_ch=3))
    shapes: Counter = Counter()
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_pre_hook(lambda _m, args: shapes.update([tuple(args[0].shape[1:])]))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    return shapes


def scan_us(x: torch.Tensor, buffer: torch.Tensor, tile: int, warps: int, store_diff: bool) -> float:
    b, c = x.shape[:2]
    inner = x.numel() // (b * c)
    rb = min(_pow2(inner), tile)  # as fused._scan_tiles with _TILE = tile
    cb = max(1, min(_pow2(c), tile // rb))
    tiles = -(-c // cb)
    chmin, chmax = torch.empty(2, b, c, device=x.device), torch.empty(2, b, c, device=x.device)
    partials = torch.empty(2, b, tiles, 2, device=x.device)
    return device_us(lambda: kernels.scan_kernel[(b, tiles)](
        x, buffer, chmin, chmax, partials, b, c, inner, tiles, HAS_DIFF=True, STORE_DIFF=store_diff, CB=cb, RB=rb,
        num_warps=warps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--configs", default="1024x4,1024x2,1024x8,512x2,512x4,2048x4,2048x8,4096x8",
                        help="comma-separated VALUESxWARPS")
    parser.add_argument("--out")
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    shapes = site_shapes()
    rows, per_step = [], Counter()
    for store_diff in (False, True):
        for shape, sites in shapes.items():
            x = torch.randn(args.batch, *shape, device="cuda")
            buffer = torch.randn(2, *x.shape, device="cuda")
            row = {"shape": list(shape), "sites": sites, "store_diff": store_diff,
                   "torch_read2_write1": device_us(lambda: torch.add(x, buffer[0], out=buffer[1]))}
            for tile, warps in configs:
                row[f"{tile}x{warps}"] = scan_us(x, buffer, tile, warps, store_diff)
            for name, us in row.items():
                if isinstance(us, float):
                    per_step[f"{'store_diff' if store_diff else 'stats'} {name}"] += us * sites / 1000
            rows.append(row)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
               "sites": sum(shapes.values()),
               "gb_per_step_float32": sum(torch.Size(s).numel() * n for s, n in shapes.items()) * args.batch * 4 / 1e9,
               "ms_per_step": {k: round(v, 2) for k, v in per_step.items()}, "rows": rows}
    print(json.dumps(summary["ms_per_step"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
