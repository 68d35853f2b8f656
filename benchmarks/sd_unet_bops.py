"""MACs, BOPs and MoDiff state of Stable Diffusion v1.x's UNet, counted on the meta device (no weights).

    python benchmarks/sd_unet_bops.py --out benchmarks/results/sd15_unet_bops.json

The UNet2DConditionModel is built from SD v1.5's published config (`modiff.models.diffusers.reference`)
on the meta device: shapes only, no memory and no download. It is wrapped with its scheduler's schedule
(`modiff.load_model`) and counted by the toolkit's cost module (`modiff.quant.cost.preset_report`): one
forward of one 4x64x64 latent (a 512x512 image) with a 77x768 text context, hooks on every Conv2d/Linear
and on the attention modules. Per UNet evaluation; classifier-free guidance evaluates it twice per image
and step. BOPs = MACs x weight bits x activation bits of the Conv/Linear layers (the paper's GBops);
the attention matmuls stay in full precision and are reported apart, as MACs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers import DDIMScheduler

import modiff as md
from modiff.models.diffusers.reference import SD15_SCHEDULER, sd15_unet_on_meta
from modiff.quant.cost import preset_report

PRESETS = ("fp", "w8a32", "w8a8", "w8a8-modiff", "w8a4-modiff", "w4a8-modiff", "w4a4-modiff")


def count(presets: tuple[str, ...], steps: int) -> list[dict[str, object]]:
    net = sd15_unet_on_meta()
    model = md.load_model(net, scheduler=DDIMScheduler(**SD15_SCHEDULER))
    rows = []
    with model.placeholder_condition():
        for name in presets:
            report = preset_report(model, md.presets[name], steps)
            report.pop("layers")
            rows.append({"preset": name, "parameters": sum(p.numel() for p in net.parameters()), **report})
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| preset | GBOPs per step | GBOPs per trajectory | MoDiff state MB / image |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['gbops_per_step']:,.0f} | {r['gbops_per_trajectory']:,.0f} | "
                     f"{r['modiff_state_mb_per_image']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="Steps of one trajectory (warm-up step at 32 bits).")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows.")
    args = parser.parse_args()
    rows = count(tuple(args.presets.split(",")), args.steps)
    first = rows[0]
    print(f"SD v1.5 UNet: {first['parameters']:,} parameters, {len(rows)} presets, {args.steps} steps; per evaluation: "
          f"{first['gmacs_conv_linear']:.1f} GMAC in {first['layers_counted']} Conv/Linear layers, "
          f"{first['gmacs_attention_matmuls']:.1f} GMAC in attention matmuls")
    print(markdown(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"model": "SD v1.5 UNet2DConditionModel (meta device)", "steps": args.steps,
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
