#!/usr/bin/env bash
# The GPU checks, from a fresh checkout on a fresh GPU machine (image: torch 2.11 CUDA 13.0,
# triton 3.6, transformers 5.17, Python 3.12; no network), in under 8 minutes with the build:
# install (hift._C for this device's arch only, all cores), then each item of bench/gpu_check.py
# under its own time limit, so one failure or hang loses nothing else. Tables, logs, the
# profiler trace and summary.md go to $OUT (default bench/results/gpu_check); the last lines
# are one verdict per item.
#
#   bash bench/gpu_check.sh            # on a GPU
#   bash bench/gpu_check.sh --dry-run  # CPU, tiny sizes: the script's own logic, in a minute or two
set -u
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
OUT=${OUT:-$PWD/bench/results/gpu_check}
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
VERDICTS=()

item() {  # item NAME SECONDS: one bench/gpu_check.py item under its own limit
  local name=$1 limit=$2 t0=$(date +%s) rc line
  timeout --kill-after=10 "$limit" python -m bench.gpu_check "$name" --out "$OUT" $DRY > "$OUT/$name.log" 2>&1
  rc=$?
  line=$(grep -E "^VERDICT $name:" "$OUT/$name.log" | tail -n 1)
  if [ -z "$line" ]; then
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then line="VERDICT $name: FAIL: timed out after ${limit}s"
    else line="VERDICT $name: FAIL: exited $rc without a verdict ($(tail -n 1 "$OUT/$name.log" | cut -c1-120))"; fi
  fi
  VERDICTS+=("$line ($(( $(date +%s) - t0 )) s)")
}

python -c "import torch, sys; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'Python', sys.version.split()[0])" > "$OUT/machine.txt" 2>&1
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/machine.txt" 2>&1
  # this device's arch only, every core: the build is most of the budget
  export TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export MAX_JOBS=$(nproc)
  timeout 240 python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
    && VERDICTS+=("VERDICT install: PASS: hift._C for sm_${TORCH_CUDA_ARCH_LIST/./} ($(( $(date +%s) - START )) s)") \
    || VERDICTS+=("VERDICT install: FAIL: see install.log")
fi

if [ -n "$DRY" ]; then LIMITS=(60 60 60 60 60 60 60); else LIMITS=(120 40 40 70 80 50 60); fi
NAMES=(tests fused_update pcie overlap peak methods fsdp_offload)
for i in "${!NAMES[@]}"; do item "${NAMES[$i]}" "${LIMITS[$i]}"; done

{
  echo "# gpu_check summary$( [ -n "$DRY" ] && echo ' (dry run)' ) ($(( $(date +%s) - START )) s)"
  echo
  cat "$OUT/machine.txt"
  echo
  for line in "${VERDICTS[@]}"; do echo "$line"; done
} > "$OUT/summary.md"
cat "$OUT/summary.md"
# a dry run checks the script, not the machine: it passes when every item gave its verdict
if [ -n "$DRY" ]; then
  ! grep -q "without a verdict\|timed out" "$OUT/summary.md"
else
  ! grep -q "^VERDICT [a-z_]*: FAIL" "$OUT/summary.md"
fi
