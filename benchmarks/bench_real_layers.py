"""Every real MoDiff layer (W8A8, or W4A8 with --format w4a8) of a UNet, its kernels timed alone, against the bf16
op the fp path runs.

    python benchmarks/bench_real_layers.py --arch cifar10 --batch 512 --out benchmarks/results/real_layers_h200.json
    python benchmarks/bench_real_layers.py --arch cifar10 --batch 512 --tilings --tilings-out modiff/quant/kernels/gemm_tilings.json

The end-to-end profile (`bench_real.py --profile`) gives the real path's kernels summed over a step; this splits
them by layer, so a reader sees which shapes make the gap. The network is quantized with the real preset
(``--format``), one warm-up step and one modulated step run eagerly under bf16 autocast on channels_last
inputs, and each real layer's input, state (a_hat, o_hat) and weights are taken from that second step. Per layer:

  fp_us        the layer in bf16 as the fp path runs it: F.conv2d (cuDNN) or F.linear (cuBLAS), bias included
  quantize_us  the quantize kernels (`real._codes`: per-sample absmax of r = x - a_hat, codes, a_hat advanced)
  gemm_us      the implicit GEMM with the modulated epilogue (o_hat += s_a s_w acc), the tiling the layer
               uses (`real.gemm_blocks`); with --tilings, also each of `real.CANDIDATE_TILINGS`
  op_us        the whole registered op (`real.real_modulated`), what a step launches

Each is the device time of 20 calls replayed as one CUDA graph, the median of five trials (`profiling.device_us`).
The totals sum the layers: one step's worth of each kernel kind. With --tilings-out (needs --tilings), the
fastest candidate of each GEMM shape that beats the layer's current tiling by more than `bench_real_gemm.MARGIN`
is merged into the tilings table the kernels read. CUDA only, except:

    python benchmarks/bench_real_layers.py --arch cifar10 --batch 512 --floors      # any machine

which prints, without timing anything, what no kernel can beat on an H200 (`H200`): the bytes each kernel kind
must move per step (`traffic`: the quantize kernels read the input and a_hat twice, once for the per-sample range
and once to quantize, and write the codes and a_hat; the GEMM reads the codes once and o_hat, and writes o_hat and
the output; the fp op reads its input and writes its output, bf16) at the HBM bandwidth, and the multiply-adds at
the dense INT8 or BF16 tensor-core peak, for MoDiff with a float32 and a bfloat16 state and for direct W8A8 (no
state: the same two passes over the input, no a_hat or o_hat). The shapes come from a capture at batch 1 (bytes
and MACs scale with the batch).
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import benchmark_model  # noqa: E402
from bench_real_gemm import MARGIN  # noqa: E402
from profiling import cuda_kernel_args, device_us, device_us_trials  # noqa: E402

from modiff.quant import presets, quantize, trajectory  # noqa: E402
from modiff.quant.kernels import real  # noqa: E402
from modiff.quant.layers.real import RealModulatedLayer  # noqa: E402
from modiff.utils.runs import atomic_path  # noqa: E402

PRESETS = {"int8": "w8a8-int8-modiff-real", "fp8_e4m3": "w8a8-fp8-modiff-real", "w4a8": "w4a8-int8-modiff-real"}


@dataclass
class Captured:
    """One real layer's call in the modulated step: its input and its state before the call."""
    name: str
    layer: RealModulatedLayer
    x: Tensor
    a_hat: Tensor
    o_hat: Optional[Tensor]


def capture(arch: str, fmt: str, batch: int, device: torch.device) -> list[Captured]:
    """The real layers' calls of one modulated step (the second model call of a trajectory)."""
    model = quantize(benchmark_model(arch), presets[PRESETS[fmt]]).to(device)
    model.net.to(memory_format=torch.channels_last)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, RealModulatedLayer)]
    calls: list[Captured] = []
    recording = [False]

    def hook(name: str, layer: RealModulatedLayer, args: tuple) -> None:
        if recording[0]:
            state = layer.state
            o_hat = None if state.o_hat is None else state.o_hat.clone()  # None: the simulator's fallback (CPU)
            calls.append(Captured(name, layer, args[0].detach().clone(), state.a_hat.clone(), o_hat))

    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: hook(name, mod, args)) for name, m in layers]
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, *model.sample_shape, device=device, generator=generator)
    # the next step's input, as a sampler would give it: every layer's input changes, also before the time embedding
    x_next = x + 0.1 * torch.randn(x.shape, device=device, generator=generator)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    try:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16), trajectory(model):
            model(x.contiguous(memory_format=torch.channels_last), t)
            recording[0] = True
            model(x_next.contiguous(memory_format=torch.channels_last), t - 10)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _fp_op(call: Captured) -> Any:
    """The layer as the fp path runs it under bf16 autocast (weights in bf16, channels_last for convolutions)."""
    layer = call.layer
    weight, bias = layer.weight.detach().bfloat16(), None if layer.bias is None else layer.bias.detach().bfloat16()
    x = call.x.bfloat16()
    if layer.conv_geometry is None:
        return lambda: F.linear(x, weight, bias)
    (sh, sw), (ph, pw) = layer.conv_geometry
    weight = weight.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    return lambda: F.conv2d(x, weight, bias, (sh, sw), (ph, pw))


def time_layer(call: Captured, tilings: bool) -> dict[str, Any]:
    layer = call.layer
    x = call.x.contiguous(memory_format=torch.channels_last) if call.x.ndim == 4 else call.x.contiguous()
    geometry = layer._geometry(x)
    b, _, _, c, ho, wo, n, kh, kw = geometry[:9]
    packed, w_scale, offset = layer.weight_packed, layer.weight_scale_n, layer.weight_offset_n
    m, fp8, int4 = b * ho * wo, packed.dtype == torch.uint8 and offset is None, offset is not None
    a_hat, o_hat = call.a_hat.clone(), call.o_hat.clone()
    codes, scales = real._codes(x, a_hat.clone(), fp8)
    blocks = real.gemm_blocks(m, n, c, kh * kw, fp8, int4)

    def gemm(with_blocks: dict[str, int]) -> Any:
        return lambda: real._gemm(codes, scales, packed, w_scale, None, o_hat, geometry, torch.bfloat16, with_blocks,
                                  offset)

    row: dict[str, Any] = {
        "layer": call.name, "kind": "linear" if layer.conv_geometry is None else f"conv{kh}x{kw}",
        "geometry": geometry, "m": m, "n": n, "k": c * kh * kw, "input_dtype": str(call.x.dtype).removeprefix("torch."),
        "state_dtype": str(a_hat.dtype).removeprefix("torch."), "key": real.tiling_key(fp8, kh * kw, c, n, m, int4),
        "tiling": [blocks[k] for k in real.TILING_KEYS],
        "fp_us": round(device_us(_fp_op(call), graph=True), 1),
        "quantize_us": round(device_us(lambda: real._codes(x, a_hat, fp8), graph=True), 1),
        "gemm_us": round(device_us(gemm(blocks), graph=True), 1),
        "op_us": round(device_us(lambda: real.real_modulated(x, a_hat, o_hat, packed, w_scale, geometry,
                                                             torch.bfloat16, offset), graph=True), 1),
    }
    row["gemm_tflops"] = round(2.0 * m * n * row["k"] / row["gemm_us"] / 1e6, 1)
    if tilings:
        row["candidates"] = {}
        for tiling in real.CANDIDATE_TILINGS:
            try:
                trials = device_us_trials(gemm(dict(zip(real.TILING_KEYS, tiling))), graph=True)
                row["candidates"][str(list(tiling))] = round(statistics.median(trials), 1)
            except Exception as err:  # noqa: BLE001 - a tiling the compiler or the GPU refuses (shared memory)
                row["candidates"][str(list(tiling))] = f"error: {str(err)[:120]}"
    return row


STATES = {"MoDiff, float32 state": 4, "MoDiff, bfloat16 state": 2, "direct (no state)": 0}  # label -> state bytes
# H200 SXM peaks (NVIDIA's datasheet): HBM3e bandwidth, dense INT8 and BF16 tensor-core throughput
H200 = {"bytes_per_s": 4.8e12, "int8_ops_per_s": 1979e12, "bf16_flops_per_s": 989e12}


def traffic(call: Captured, batch: int, state_bytes: int, input_bytes: int = 2) -> dict[str, float]:
    """The least one step of this layer must move and compute at ``batch`` (from a capture at any batch):
    bytes of the quantize kernels (range pass and quantize pass), of the GEMM with the MoDiff epilogue, of the bf16
    fp op, and its multiply-adds. ``state_bytes`` 0 is direct W8A8 (no a_hat, no o_hat); ``input_bytes``: the
    layers' inputs are bf16 on the fast path."""
    x = call.x.contiguous(memory_format=torch.channels_last) if call.x.ndim == 4 else call.x.contiguous()
    geometry = call.layer._geometry(x)
    per_sample_out = geometry[4] * geometry[5] * geometry[6] * (x[0].numel() // (geometry[1] * geometry[2] * geometry[3]))
    n_in, n_out = x[0].numel() * batch, per_sample_out * batch
    k = geometry[3] * geometry[7] * geometry[8]
    return {"range_bytes": n_in * (input_bytes + state_bytes),
            "quantize_bytes": n_in * (input_bytes + 2 * state_bytes + 1),
            "gemm_bytes": n_in + n_out * (2 * state_bytes + 2), "fp_bytes": 2 * (n_in + n_out), "macs": n_out * k}


def floors(calls: list[Captured], batch: int, state_bytes: int, peaks: dict[str, float] = H200) -> dict[str, float]:
    """Per step, in ms: the quantize kernels' and the GEMM's memory floors, the GEMM's INT8 and the fp op's BF16
    compute floors, and the fp op's memory floor, summed over the layers."""
    summed: dict[str, float] = {}
    for call in calls:
        for key, value in traffic(call, batch, state_bytes).items():
            summed[key] = summed.get(key, 0.0) + value
    ms = 1e3 / peaks["bytes_per_s"]
    return {"quantize_memory_ms": round((summed["range_bytes"] + summed["quantize_bytes"]) * ms, 2),
            "gemm_memory_ms": round(summed["gemm_bytes"] * ms, 2),
            "gemm_int8_compute_ms": round(2 * summed["macs"] / peaks["int8_ops_per_s"] * 1e3, 2),
            "fp_memory_ms": round(summed["fp_bytes"] * ms, 2),
            "fp_bf16_compute_ms": round(2 * summed["macs"] / peaks["bf16_flops_per_s"] * 1e3, 2)}


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kernel kind, one step's microseconds over every layer, and by layer kind."""
    keys = ("fp_us", "quantize_us", "gemm_us", "op_us")
    out: dict[str, Any] = {"all": {k: round(sum(r[k] for r in rows), 1) for k in keys}}
    for kind in sorted({r["kind"] for r in rows}):
        chosen = [r for r in rows if r["kind"] == kind]
        out[kind] = {"layers": len(chosen), **{k: round(sum(r[k] for r in chosen), 1) for k in keys}}
    return out


def better_tilings(rows: list[dict[str, Any]], margin: float = MARGIN) -> dict[str, list[int]]:
    """Per GEMM key, the candidate with the lowest summed time over the layers of that key, where it beats their
    current tilings' summed time by more than ``margin``."""
    chosen: dict[str, list[int]] = {}
    for key in dict.fromkeys(r["key"] for r in rows):
        same = [r for r in rows if r["key"] == key and "candidates" in r]
        sums = {t: sum(r["candidates"][t] for r in same) for t in same[0]["candidates"]
                if all(isinstance(r["candidates"][t], float) for r in same)} if same else {}
        if sums:
            best = min(sums, key=sums.get)
            if sums[best] < (1 - margin) * sum(r["gemm_us"] for r in same):
                chosen[key] = json.loads(best)
    return chosen


def merge_tilings(path: Path, rows: list[dict[str, Any]], run: dict[str, Any]) -> None:
    """Merge `better_tilings(rows)` into the tilings table at ``path`` (new if absent), other keys kept, and record
    the run (device, arch, format, batch) in its ``measured_layers``; written whole or not at all. A file that is not
    a tilings table is refused, untouched."""
    try:
        table = json.loads(path.read_text()) if path.is_file() else {"tilings": {}}
        if not isinstance(table, dict) or not isinstance(table.get("tilings"), dict):
            raise ValueError("no 'tilings' mapping")
    except ValueError as err:  # json's errors are ValueErrors too
        raise SystemExit(f"--tilings-out {path} is not a tilings table ({err}); name a new file, or the table "
                         f"modiff/quant/kernels/gemm_tilings.json") from None
    table["tilings"].update(better_tilings(rows))
    table.setdefault("measured_layers", []).append({**run, "margin": MARGIN, "by": "benchmarks/bench_real_layers.py"})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    def more(parser: Any) -> None:
        parser.add_argument("--arch", default="cifar10", help="cifar10 or a shipped model name (fmnist-ddim)")
        parser.add_argument("--format", choices=sorted(PRESETS), default="int8")
        parser.add_argument("--tilings", action="store_true", help="also time every candidate tiling per layer")
        parser.add_argument("--tilings-out", help="merge the tilings that beat the current ones into this table")
        parser.add_argument("--floors", action="store_true", help="print the per-step floors only (no CUDA needed)")

    args = cuda_kernel_args(__doc__, "bench_real_layers.py", batch=512, more=more, needs_cuda=lambda a: not a.floors)
    if args.tilings_out and not args.tilings:
        raise SystemExit("--tilings-out needs --tilings")
    if args.floors:
        calls = capture(args.arch, args.format, 1, torch.device("cpu"))
        print(json.dumps({label: floors(calls, args.batch, size) for label, size in STATES.items()}, indent=1))
        return
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as the fast path runs cuDNN (`modiff.pipelines.execution`): the fp column
    rows = []
    for call in capture(args.arch, args.format, args.batch, device):
        rows.append(time_layer(call, args.tilings))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "candidates"}), flush=True)
    summary = totals(rows)
    print(json.dumps(summary, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "arch": args.arch,
                                              "format": args.format, "batch": args.batch, "totals": summary,
                                              "rows": rows}, indent=1))
    if args.tilings_out:
        merge_tilings(Path(args.tilings_out), rows, {"device": torch.cuda.get_device_name(), "arch": args.arch,
                                                     "format": args.format, "batch": args.batch})


if __name__ == "__main__":
    main()
