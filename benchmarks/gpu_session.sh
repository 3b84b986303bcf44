#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (see README "On a GPU"):
#   build sm4 with its CUDA kernels, run the whole test suite on the GPU (the cuda and triton
#   backends then run on the device), then the benchmarks; logs and JSON go to $OUT.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_session.sh [pytest -k expression]
set -uo pipefail
OUT=${OUT:-results/gpu-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
SELECT=${1:-}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
unset TRITON_INTERPRET

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
$PY -m sm4 info | tee "$OUT/info.txt" | tail -12

k_args=()
[ -n "$SELECT" ] && k_args=(-k "$SELECT")
$PY -m pytest tests -q -p no:cacheprovider -rfE "${k_args[@]}" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40; tail -1 "$OUT/tests.log"

$PY -m pytest benchmarks -q -p no:cacheprovider "${k_args[@]}" --benchmark-json "$OUT/benchmarks.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name > "$OUT/benchmarks.log" 2>&1
echo "benchmarks rc=$?"
$PY - "$OUT/benchmarks.json" <<'PY'
import json, sys
for b in json.load(open(sys.argv[1]))["benchmarks"]:
    i = b["extra_info"]
    speedups = " ".join(f"{k[12:]}={v:.2f}x" for k, v in i.items() if k.startswith("speedup_over_"))
    print(f'{b["name"][:70]:70s} {b["stats"]["median"] * 1e3:10.3f} ms {i.get("TFLOPs", 0):7.2f} TFLOP/s {i.get("GBps", 0):8.1f} GB/s {speedups}')
PY
# Measured beside predicted (issue #14: BENCHMARKS.md "GPU: predicted roofline fractions"): each
# benchmark row the model knows, its median, the predicted time and both fractions of its roofline.
$PY -m benchmarks.gpu_roofline compare "$OUT/benchmarks.json" --gpu auto | tee "$OUT/roofline.txt"
