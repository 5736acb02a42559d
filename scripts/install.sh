#!/usr/bin/env bash
# Install everything into .venv from scratch (idempotent): torch, test/benchmark dependencies,
# then this package, compiling its extension (CUDA kernels too when nvcc is found).
#
# Environment knobs (all optional):
#   UNILORA_VENV          where the virtual environment lives (default: <repo>/.venv)
#   PYTHON                interpreter that creates it (default: python3)
#   TORCH_SPEC            torch requirement (default: torch==2.14.1, the CUDA 13 build with triton)
#   TORCH_CUDA_ARCH_LIST  GPU architectures to compile (default here: 8.0;9.0)
#   FORCE_CPU=1           build the CPU-only extension even when nvcc is present
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNILORA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

step "installing $TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC"
step "installing test and benchmark dependencies"
"${PIP[@]}" numpy ninja cmake build wheel pytest expecttest "peft==0.21.2" transformers safetensors matplotlib tqdm bitsandbytes torchao

# The CUDA build needs nvcc and the CUDA headers that torch's headers include (cusparse.h
# ships in the nvidia/cu13 wheel).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
NV_INC="$("$VENV/bin/python" - <<'PY' 2>/dev/null || true
import glob, os, site
for sp in site.getsitepackages():
    for inc in sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include"))):
        print(inc)
        raise SystemExit
PY
)"
if [ -n "$NV_INC" ]; then export CPATH="$NV_INC${CPATH:+:$CPATH}"; fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Keep ptxas register/spill reports of every CUDA kernel in the build log (checked by a test).
export UNILORA_PTXAS_VERBOSE="${UNILORA_PTXAS_VERBOSE:-1}"

step "building and installing unilora_kernels (CUDA_HOME=${CUDA_HOME:-none}, archs=$TORCH_CUDA_ARCH_LIST)"
mkdir -p "$ROOT/build/logs"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v "$ROOT" \
    >"$ROOT/build/logs/pip-install.log" 2>&1; then
  tail -n 60 "$ROOT/build/logs/pip-install.log"
  echo "install failed; full log: build/logs/pip-install.log" >&2
  exit 1
fi
"$VENV/bin/python" -P -c "import json, unilora_kernels as u; print(json.dumps(u.build_info(), indent=1))"
