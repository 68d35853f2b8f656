#!/usr/bin/env bash
# The real backend on one GPU machine: the real W8A8 backend's CUDA tests, bench_real_gemm.py, then bench_real.py, in at most about 9.5 minutes (tests <= 150 s, GEMM <= 120 s, benchmark <= 300 s).
# Run from the repository root on the GPU machine, with $OUT set (what is written there comes back) and torchao's
# wheel in .whl/ for the peer rows (pip download torchao==0.17.0 --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 --implementation cp -d .whl):  bash benchmarks/run_real_on_gpu.sh
# Writes: $OUT/i27-env.log, i27-pip.log, i27-tests.log, i27-gemm.log, i27-gemm.json, i27-bench.log, i27-bench.json, i27-summary.txt
set -u
OUT=${OUT:-/tmp/i27-out}
mkdir -p "$OUT"
SUMMARY="$OUT/i27-summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# 1. torchao from the carried wheel (no index, no dependencies: torch is the box's own)
if ls .whl/*.whl > /dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/i27-pip.log" 2>&1; then
        note "ok: torchao wheel installed into /tmp/site"
    else
        note "FAILED: torchao wheel install (see i27-pip.log); the torchao rows will be skipped"
    fi
else
    note "FAILED: no wheel in .whl/ (carry /work/coord/wheels-i27/*.whl); the torchao rows will be skipped"
fi
export PYTHONPATH="$PWD:/tmp/site"
python3 - > "$OUT/i27-env.log" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
try:
    import triton
    print("triton", triton.__version__)
except Exception as err:
    print("triton: not importable:", err)
try:
    import torchao
    print("torchao", torchao.__version__)
except Exception as err:
    print("torchao: not importable:", type(err).__name__, err)
EOF
cat "$OUT/i27-env.log" | tee -a "$SUMMARY"

# 2. The CUDA tests of this issue (kernels vs simulator on tensor cores, compile, CUDA graphs, CPU fallback)
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs \
    tests/quant/kernels/test_real_kernels.py tests/quant/kernels/test_real_cuda.py tests/quant/test_real_backend.py \
    > "$OUT/i27-tests.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then note "ok: CUDA tests passed ($(tail -1 "$OUT/i27-tests.log"))"
elif [ $rc -eq 124 ]; then note "FAILED: CUDA tests ran past 150 s (partial log in i27-tests.log)"
else
    note "FAILED: CUDA tests, exit $rc: $(tail -1 "$OUT/i27-tests.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/i27-tests.log" | head -20 | tee -a "$SUMMARY"
fi

# 3. The GEMM alone against cuDNN's bf16 convolution, per layer shape and tiling (<= 120 s)
timeout 120 python3 benchmarks/bench_real_gemm.py --batch 512 --out "$OUT/i27-gemm.json" > "$OUT/i27-gemm.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then note "ok: GEMM benchmark finished"; else note "FAILED: GEMM benchmark, exit $rc (see i27-gemm.log)"; fi

# 4. The benchmark: CIFAR-10 UNet first (batch 512, then 64), fmnist-ddim after, 100 DDIM steps, one timed run
#    each, after the per-step error runs (eager, batch 16); no new row after 200 s (rows in priority order: compilation takes about a minute per
#    variant and batch size, so expect fp and the real MoDiff rows at batch 512 first). JSON rewritten after every row.
cd benchmarks
timeout 300 python3 bench_real.py --archs cifar10,fmnist-ddim --batch-sizes 512,64 --steps 100 --repeats 1 \
    --variants fp,real-int8-modiff,real-fp8-modiff,real-int8,torchao-fp8,sim-int8-modiff,real-fp8,torchao-int8,real-int8-modiff-bf16 \
    --error-batch 16 --budget 200 --profile --out "$OUT/i27-bench.json" > "$OUT/i27-bench.log" 2>&1
rc=$?
cd ..
if [ $rc -eq 0 ]; then note "ok: benchmark finished"
elif [ $rc -eq 124 ]; then note "FAILED: benchmark ran past 300 s; the rows done so far are in i27-bench.json"
else note "FAILED: benchmark exit $rc (see the end of i27-bench.log)"; tail -5 "$OUT/i27-bench.log" | tee -a "$SUMMARY"
fi
python3 - "$OUT/i27-bench.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
try:
    result = json.load(open(sys.argv[1]))
except Exception as err:
    sys.exit(f"FAILED: no benchmark JSON ({err})")
for row in result["rows"]:
    status = row.get("images_per_s", "ERROR: " + row["error"][:150] if "error" in row else "skipped: " + row.get("skipped", ""))
    print(f"{row['arch']:12} {row['variant']:22} batch {row['batch']:4}  {status}")
for key, value in result.get("errors", {}).items():
    if isinstance(value, dict):
        print("error", key, {k: (v.get("max") if isinstance(v, dict) else v) for k, v in value.items()})
EOF
