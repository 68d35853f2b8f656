"""The real backend's GEMM compiled for Hopper (sm_90a) without a GPU: registers, spills, shared memory, pipelining.

    python benchmarks/compile_real_gemm.py --out benchmarks/results/real_gemm_compiled_sm90.json
    python benchmarks/compile_real_gemm.py --tilings --formats w4a8       # every candidate tiling too
    python benchmarks/compile_real_gemm.py --shapes fmnist --formats int8,w4a8

Run it without TRITON_INTERPRET (the interpreter's kernels do not compile).

Triton compiles a kernel for a target it is told (here the H200's sm_90a) on any machine, and its bundled ptxas
reports the registers and spills of the result. So before a GPU is at hand one can see whether a kernel variant
spills, how much shared memory its tiling takes, and whether its operand loads are pipelined: Triton's pipeliner
turns a load it can vectorize into asynchronous copies into shared memory, several iterations ahead
(`async_copies` counts them in the kernel's TTGIR: the prologue's and the loop's, one per pipelined operand and
stage), and whether an operand computed in registers is written to shared memory for the MMA (`register_tiles_to_shared`
counts the TTGIR's shared allocations initialized from registers: W4A8's widened weight tile, when it is wgmma's
second operand, which Hopper reads from shared memory only). None of it is a timing.

The arguments are `real.gemm_arguments`' for one layer call (the 3x3 shapes of `bench_real_gemm.py`), specialized
as Triton's JIT specializes a launch: a pointer (16-byte aligned) and an integer divisible by 16 are marked so, an
integer equal to 1 becomes a constant. Formats: int8 and fp8 (W8A8), w4a8 (4-bit weights, INT8 activations);
epilogues: direct and modulated (o_hat); tilings: the heuristic's (`real.heuristic_blocks`), with --tilings also
each of `real.CANDIDATE_TILINGS`. Compile with the Triton the GPU runs (the H200 image: 3.6.0) for numbers that
carry over; the JSON records the version.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_gemm import SHAPES  # noqa: E402

from modiff.quant.kernels import real  # noqa: E402

FORMATS = ("int8", "fp8", "w4a8")
TRITON_TYPES = {torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.float32: "fp32", torch.bfloat16: "bf16"}


def specialize(names: list[str], args: list[Any]) -> tuple[dict[str, str], dict[str, Any], dict[tuple, list]]:
    """(signature, constants, attributes) of runtime arguments as Triton's JIT specializes a launch."""
    signature, constants, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
            continue
        else:
            signature[name] = "i32"
            aligned = value % 16 == 0
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _operands(fmt: str, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Placeholder codes, packed weights and offsets of the format (their dtypes and alignment are what counts)."""
    codes = torch.empty(16, dtype=torch.uint8 if fmt == "fp8" else torch.int8)
    zeros = torch.zeros(weight_shape)
    if fmt == "w4a8":
        packed, offset = real.pack_weight_int4(zeros, torch.zeros(weight_shape[0]), qmin=-7)
        return codes, packed, offset
    return codes, real.pack_weight(zeros, "fp8_e4m3" if fmt == "fp8" else "int"), None


def compile_gemm(geometry: real.Geometry, fmt: str, modulated: bool, tiling: dict[str, int]) -> dict[str, Any]:
    """One GEMM compiled for sm_90a: registers, spills, shared memory, async copies, wgmma, register tiles to shared."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from modiff.quant.kernels import real_triton

    codes, weight, offset = _operands(fmt, (geometry[6], geometry[3], geometry[7], geometry[8]))
    floats = torch.empty(16, dtype=torch.float32)
    args, constexprs = real.gemm_arguments(codes, floats, weight, floats, None, floats if modulated else None,
                                           torch.empty(16, dtype=torch.bfloat16), geometry, offset)
    names = real_triton.gemm_kernel.arg_names
    signature, constants, attrs = specialize(names[:len(args)], args)
    for name, value in {**constexprs, **{k: v for k, v in tiling.items() if k.startswith("BLOCK")}}.items():
        signature[name], constants[name] = "constexpr", value
    source = ASTSource(real_triton.gemm_kernel, signature, constants, attrs)
    options = {"num_warps": tiling["num_warps"], "num_stages": tiling["num_stages"]}
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    usage = ptxas_usage(kernel.asm["ptx"])
    ttgir = kernel.asm["ttgir"]
    return {**usage, "shared_bytes": kernel.metadata.shared,
            "async_copies": ttgir.count("async_copy_global_to_local"), "wgmma": "warp_group_dot" in ttgir,
            "register_tiles_to_shared": ttgir.count("ttg.local_alloc %")}


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers and spill bytes that Triton's bundled ptxas reports for sm_90a."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(path), "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": int(re.search(r"Used (\d+) registers", report).group(1)),
            "spill_store_bytes": int(spills.group(1)), "spill_load_bytes": int(spills.group(2))}


def rows(batch: int, formats: tuple[str, ...], all_tilings: bool, shapes: str = "") -> list[dict[str, Any]]:
    """The compiled kernels of each shape whose name contains ``shapes`` (all for "")."""
    out = []
    for shape, c, res in (s for s in SHAPES if shapes in s[0]):
        geometry = [batch, res, res, c, res, res, c, 3, 3, 1, 1, 1, 1]
        m = batch * res * res
        tilings = [("heuristic", real.heuristic_blocks(m, c, c))]
        if all_tilings:
            tilings += [(str(t), dict(zip(real.TILING_KEYS, t))) for t in real.CANDIDATE_TILINGS]
        for fmt in formats:
            for modulated in (False, True):
                for label, tiling in tilings:
                    row = {"shape": shape, "format": fmt, "epilogue": "modulated" if modulated else "direct",
                           "tiling": label, "blocks": [tiling[k] for k in real.TILING_KEYS],
                           **compile_gemm(geometry, fmt, modulated, tiling)}
                    print(json.dumps(row), flush=True)
                    out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--tilings", action="store_true", help="also every candidate tiling")
    parser.add_argument("--shapes", default="", help="only the shapes whose name contains this (e.g. fmnist)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    formats = tuple(args.formats.split(","))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or args.batch < 1:
        parser.error(f"unknown formats {unknown}; known: {', '.join(FORMATS)}" if unknown else "--batch must be >= 1")
    if not any(args.shapes in name for name, _, _ in SHAPES):
        parser.error(f"no shape's name contains {args.shapes!r}; the shapes: {', '.join(n for n, _, _ in SHAPES)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 makes Triton's kernels interpreted, which do not compile: unset it")
    import triton

    from modiff.utils.runs import environment, write_json

    result = {"target": "sm_90a", "triton": triton.__version__, "environment": environment(), "batch": args.batch,
              "rows": rows(args.batch, formats, args.tilings, args.shapes)}
    if args.out:
        write_json(result, Path(args.out))  # whole or not at all: a stopped run leaves no partial file


if __name__ == "__main__":
    main()
