"""A lower bound on one network step's device time: bytes that must cross HBM and FLOPs, at given peaks.

    python benchmarks/traffic_floor.py --model fmnist-ddim --batch 1024
    python benchmarks/traffic_floor.py --model cifar10 --batch 512 --measured-img-s 211.8 --steps 100
    python benchmarks/traffic_floor.py --model fmnist-ddim --batch 1024 --preset w8a4-modiff

Counted on the CPU with forward hooks (batch 1, scaled), every activation in bf16 (2 bytes), assuming the
fusion inductor can do at best around cuDNN's convolutions, which read their input and write their output:

  Conv2d           read the input, write the output
  GroupNorm        read the input twice (statistics, then normalise; SiLU and a preceding add fused in),
                   write the output once
  residual add     read x and h, write x + h (a block's output; no convolution epilogue takes it)
  concatenation    read the parts, write the whole (the up path's skip connections)
  nearest upsample read the input, write the 4x output
  attention        read q, k and v, write the output (a fused kernel: scores never reach HBM)

With ``--preset`` the simulated quantization of every selected Conv2d/Linear input adds (bf16, as under autocast):

  modulated        the range kernel reads a_t and a_hat, the update kernel reads both again and writes a_hat
                   (5 input-size passes; the layer then convolves a_hat, which the convolution row counts), once
                   per input that layers share (`shared_input_pairs` of `modiff.quant.layers.trajectory`: q, k, v)
  direct           the range pass reads a_t, the quantize pass reads it again and writes Q(a_t) (3 passes)

Weights and the time embedding are left out (small). FLOPs: 2 x MACs of the convolutions and 4 L^2 C per
attention. The floor is max(bytes / bandwidth, FLOPs / peak) summed per operation kind as if every kind ran
at its roofline; real kernels reach a fraction of both, so a measured step far above the floor has room,
near it has none. Peaks default to the H200's datasheet values (4.8 TB/s HBM3e, 989 dense bf16 TFLOP/s).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from contextlib import ExitStack

import torch
from torch import nn

from bench_models import benchmark_model
from modiff.models.ddim_unet import AttentionCore, AttnBlock, ResnetBlock, Upsample
from modiff.quant import presets, quantize, select_layers
from modiff.quant.layers.trajectory import shared_input_pairs

BYTES = 2  # bf16
QUANTIZE_PASSES = {"modulated": 5, "direct": 3}  # input-size passes per quantized layer, as the docstring counts


def quantize_passes(preset: str) -> int:
    """Input-size passes of the preset's activation quantization per selected layer (0: activations exact)."""
    config = presets[preset]
    if config.mode not in ("fp", *QUANTIZE_PASSES):
        raise ValueError(f"preset {preset!r} has mode {config.mode!r}: only direct and modulated presets are counted")
    return QUANTIZE_PASSES[config.mode] if config.activation is not None and config.mode != "fp" else 0


def shared_state_followers(model: nn.Module, preset: str) -> set[str]:
    """Names of the layers that read another layer's MoDiff state under ``preset`` (no modulation of their own)."""
    qmodel = quantize(model, presets[preset])
    names = {id(module): name for name, module in qmodel.named_modules()}
    return {names[id(follower)] for follower, _ in shared_input_pairs(qmodel)}


def count(model: nn.Module, preset: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """(elements moved, FLOPs) per operation kind for one step of one image; with a quantization preset,
    the passes of its activation quantization over each selected layer's input as the kind "quantize"."""
    moved: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)

    def conv(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        moved["convolution"] += inputs[0].numel() + output.numel()
        kh, kw = module.kernel_size
        flops["convolution"] += 2.0 * output.numel() * module.in_channels // module.groups * kh * kw

    def norm(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        moved["groupnorm"] += 2 * inputs[0].numel() + output.numel()

    def residual(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        moved["residual add"] += 3 * output.numel()

    def concat(module: nn.Module, inputs: tuple) -> None:
        moved["concatenation"] += 2 * inputs[0].numel()

    def upsample(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        moved["upsample"] += 5 * inputs[0].numel()

    def attention(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        q = inputs[0]
        moved["attention"] += 3 * q.numel() + output.numel()
        length = q.shape[-1] * q.shape[-2]
        flops["attention"] += 4.0 * q.shape[0] * length * length * q.shape[1]

    passes = quantize_passes(preset) if preset is not None else 0
    quantized = set(select_layers(model, presets[preset])) if passes else set()
    if passes and presets[preset].mode == "modulated":
        quantized -= shared_state_followers(model, preset)

    def quantize(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        moved["quantize"] += passes * inputs[0].numel()

    unet = model.net if hasattr(model, "net") else model
    hooks = {nn.Conv2d: conv, nn.GroupNorm: norm, ResnetBlock: residual, AttnBlock: residual, Upsample: upsample,
             AttentionCore: attention}
    with ExitStack() as stack, torch.no_grad():
        for name, module in model.named_modules():
            if name in quantized:
                stack.callback(module.register_forward_hook(quantize).remove)
        for name, module in unet.named_modules():
            for kind, hook in hooks.items():
                if isinstance(module, kind):
                    stack.callback(module.register_forward_hook(hook).remove)
            if name.startswith("up.") and isinstance(module, ResnetBlock):
                stack.callback(module.register_forward_pre_hook(lambda m, args: concat(m, args)).remove)
        unet(torch.zeros(1, *model.sample_shape), torch.tensor([500]))
    return dict(moved), dict(flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fmnist-ddim", help="a model preset, or cifar10 (random weights)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--preset", help="a quantization preset: add its activation quantization passes")
    parser.add_argument("--bandwidth-tb-s", type=float, default=4.8)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--measured-img-s", type=float, help="images/s of a measured run, for its ms per step")
    parser.add_argument("--steps", type=int, default=100, help="steps per image of the measured run")
    args = parser.parse_args()
    if args.preset is not None and args.preset not in presets:
        parser.error(f"unknown preset {args.preset!r}; known: {', '.join(sorted(presets))}")
    try:
        moved, flops = count(benchmark_model(args.model), args.preset)
    except ValueError as error:  # a caching preset
        parser.error(str(error))
    total = 0.0
    print(f"{args.model}{f' ({args.preset})' if args.preset else ''}, batch {args.batch}, bf16: per network step")
    print(f"{'kind':16} {'GB moved':>9} {'GFLOP':>9} {'floor ms':>9}")
    for kind in sorted(set(moved) | set(flops), key=lambda k: -moved.get(k, 0.0)):
        gb = moved.get(kind, 0.0) * BYTES * args.batch / 1e9
        gflop = flops.get(kind, 0.0) * args.batch / 1e9
        floor_ms = max(gb / (args.bandwidth_tb_s * 1e3), gflop / (args.peak_tflops * 1e3)) * 1e3
        total += floor_ms
        print(f"{kind:16} {gb:9.2f} {gflop:9.1f} {floor_ms:9.2f}")
    print(f"{'floor':16} {'':9} {'':9} {total:9.2f} ms per step = {args.batch / (total * args.steps / 1e3):.0f} "
          f"images/s at {args.steps} steps")
    if args.measured_img_s:
        measured = args.batch / args.measured_img_s / args.steps * 1e3
        print(f"measured: {measured:.2f} ms per step ({args.measured_img_s:g} images/s), {measured / total:.2f}x the floor")


if __name__ == "__main__":
    main()
