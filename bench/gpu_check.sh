#!/usr/bin/env bash
# The GPU checks, for a session with a lent GPU (H200; image: torch 2.11 CUDA 13.0, triton 3.6,
# transformers 5.17, Python 3.12, nvcc, ninja, pybind11; no network). Under 10 minutes in all:
#   1. install the project (builds hift._C with its CUDA kernels)       <= 200 s
#   2. the GPU tests (-m cuda) and the Triton kernel tests compiled    <= 120 + 90 s
#   3. the kernel benchmarks, where present (bench_adamw.py, bench_triton_kernels.py) <= 40 s each
#   4. LLaMA-2-7B config, batch 1, seq 512, bf16: hift, hift-lean (state_chunk_mib=256,
#      recompute_activations), hift-bf16m (bf16 moments: half the PCIe bytes) and LOMO,
#      measured peak and step time against the planner (bench/llama7b_gpu.py) <= 430 s
# Every part runs under `timeout`, so one failure does not lose the rest. Tables and logs go to
# $OUT (default ./gpu_out); a short summary is printed last.
#
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONWARNINGS=ignore MAX_JOBS=${MAX_JOBS:-16}
SUMMARY=()
START=$(date +%s)

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="failed (rc $rc)"
  SUMMARY+=("$(printf '%-16s %-24s %4ss  %s' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-100)")")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), sys.version.split()[0])" >> "$OUT/gpu.txt" 2>&1

part install 200 python -m pip install --no-build-isolation --no-deps -e .
# the GPU tests (engine, fused update, swapper on CUDA) and the Triton kernels compiled; the
# CPU suite is CI's job
part tests 120 python -m pytest -q -p no:cacheprovider -m cuda tests
part triton_tests 90 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py
if [ -f bench/bench_adamw.py ]; then
  part bench_adamw 40 python bench/bench_adamw.py --device cuda --out "$OUT/adamw_gpu.md"
else
  SUMMARY+=("bench_adamw      skipped: bench/bench_adamw.py not present")
fi
if [ -f bench/bench_triton_kernels.py ]; then
  part bench_triton 40 python bench/bench_triton_kernels.py --out "$OUT/triton_kernels_gpu.md"
else
  SUMMARY+=("bench_triton     skipped: bench/bench_triton_kernels.py not present")
fi
part llama7b 430 env PYTHONPATH=python:. python bench/llama7b_gpu.py --out "$OUT/llama7b_gpu.md" --timeout 100
part plan 40 env PYTHONPATH=python:. python -m hift.cli plan
cp "$OUT/plan.log" "$OUT/plan.md" 2>/dev/null

echo
echo "== gpu_check summary ($(( $(date +%s) - START )) s; logs and tables in $OUT) =="
cat "$OUT/gpu.txt" 2>/dev/null | tail -n 1
for line in "${SUMMARY[@]}"; do echo "  $line"; done
grep -E "^\| (hift|hift-lean|hift-bf16m|lomo) \|" "$OUT/llama7b_gpu.md" 2>/dev/null | head -n 4
grep -E "passed|failed" "$OUT/tests.log" "$OUT/triton_tests.log" 2>/dev/null | tail -n 2
