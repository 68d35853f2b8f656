"""MoDiff's modulation kernels compiled for Hopper (sm_90a) without a GPU: registers, spills, and the one-pass
kernel's barrier as the compiler emits it.

    python benchmarks/compile_modulate.py --out benchmarks/results/modulate_compiled_sm90.json

Run it without TRITON_INTERPRET (the interpreter's kernels do not compile). Like `compile_real_gemm.py` (whose
`ptxas_usage` it uses), nothing here is a timing: it shows what the compiler made of `modulate_triton`'s kernels
for each state dtype, with and without a split shortcut. For `one_pass_kernel` it also reads the PTX: the
barrier's wait must be an acquire load (or atomic) of the arrivals counter, the arrival a release atomic, and every
merge of the chunk's range an atomic issued before that release (`barrier_in_order`), so that a program past the
barrier sees its sample's whole range.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_real_gemm import ptxas_usage  # noqa: E402

DTYPES = {"bfloat16": "bf16", "float32": "fp32"}
POINTERS = {"x_ptr", "ref_ptr", "hat_ptr"}  # in the state's dtype
FLOAT_POINTERS = {"part_ptr", "range_ptr", "levels_ptr", "qmin_ptr", "qmax_ptr"}


def _source(kernel: Any, dtype: str, constants: dict[str, Any]) -> Any:
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*" + DTYPES[dtype]
        elif name in FLOAT_POINTERS:
            signature[name] = "*fp32"
        elif name == "count_ptr":
            signature[name] = "*i32"
        else:
            signature[name] = "i32"
    return ASTSource(kernel, signature, constants, {})


def barrier_order(ptx: str) -> dict[str, Any]:
    """Where the one-pass kernel's atomics and acquire loads stand in its PTX, in order."""
    lines = [line.strip() for line in ptx.splitlines()]
    release = [i for i, line in enumerate(lines) if re.search(r"atom\.global\.gpu\.release\.add", line)]
    acquire = [i for i, line in enumerate(lines) if re.search(r"ld\.global\.gpu\.acquire|atom\.global\.gpu\.acquire", line)]
    merges = [i for i, line in enumerate(lines) if re.search(r"atom\.global\.gpu\.acq_rel\.(max|min)", line)]
    merged_before = [i for i in merges if release and i < release[0]]
    return {"release_atomics": len(release), "acquire_loads": len(acquire), "merge_atomics_before_release":
            len(merged_before), "barrier_in_order": bool(release and acquire and merged_before
                                                         and max(merged_before) < release[0] < min(acquire))}


def rows() -> list[dict[str, Any]]:
    import triton
    from triton.backends.compiler import GPUTarget

    from modiff.quant.kernels import modulate_triton as kernels

    out = []
    for dtype in DTYPES:
        for split in (False, True):
            update = dict(HAS_SPLIT=split, ASYMMETRIC=True, FLOOR=False, SAME_REF=True, BLOCK=1024)
            for kernel, constants in ((kernels.ranges_kernel, dict(HAS_SPLIT=split, BLOCK=1024)),
                                      (kernels.update_kernel, dict(update, GP=16)),
                                      (kernels.one_pass_kernel, update)):
                compiled = triton.compile(_source(kernel, dtype, constants), target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": 4})
                ptx = compiled.asm["ptx"]
                row = {"kernel": kernel.__name__, "state_dtype": dtype, "split": split, **ptxas_usage(ptx)}
                if kernel is kernels.one_pass_kernel:
                    row.update(barrier_order(ptx))
                print(row, flush=True)
                out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 makes Triton's kernels interpreted, which do not compile: unset it")
    import triton

    from modiff.utils.runs import environment, write_json

    result = {"target": "sm_90a", "triton": triton.__version__, "environment": environment(), "rows": rows()}
    if args.out:
        write_json(result, Path(args.out))


if __name__ == "__main__":
    main()
