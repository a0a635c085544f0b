#!/usr/bin/env bash
# CUDA compile check for hift._C, for CI machines without a GPU: builds the extension with its
# CUDA sources for sm_90 (HIFT_FORCE_CUDA=1) against a CUDA build of torch in .venv-cuda, into a
# throwaway directory, then loads it (no GPU needed) and checks that the CUDA kernel registered.
# Exits non-zero if anything fails to compile, link or load.
#
# Knobs: HIFT_CUDA_VENV (default .venv-cuda), HIFT_CUDA_TORCH (default torch==2.14.1),
# CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${HIFT_CUDA_VENV:-$PWD/.venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${HIFT_CUDA_TORCH:-torch==2.14.1}" numpy ninja setuptools wheel
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$VENV/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export HIFT_FORCE_CUDA=1
unset HIFT_NO_EXTENSION

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/hift-cuda-build.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT

"$VENV/bin/python" -c 'import torch; assert torch.version.cuda, "HIFT_CUDA_VENV holds a CPU-only torch"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
"$VENV/bin/python" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"

SO=$(ls "$BUILD"/lib/hift/_C*.so)
"$VENV/bin/python" - "$SO" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
for key in ("CPU", "CUDA", "Meta"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("hift::fused_adamw_", key), key
assert hasattr(torch.classes.hift, "StateSwapper")
print(f"ok: {sys.argv[1].rsplit('/', 1)[-1]} loads; fused_adamw_ has CPU, CUDA and Meta kernels")
PY
