#!/usr/bin/env bash
# GPU checks in one go, for a CUDA machine with torch, triton and nvcc already installed (no
# registry needed): build and install the package, run the `gpu`-marked tests, then the
# benchmarks. Everything lands in $OUT (default build/gpu): env.txt, build.log, pytest_gpu.log,
# bench.log, bench.tgz (the results folder). Wheels of missing packages (peft for the PEFT
# baseline, expecttest for opcheck) are taken from .whl/ when it exists.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
#
# Knobs: ARCHS (default 9.0), BENCH_ARGS (extra benchmarks/run.py arguments),
# TEST_TIMEOUT / BENCH_TIMEOUT / MULTI_TIMEOUT (seconds).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/build/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=6
PY="${PYTHON:-python3}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
  nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stamp "building (archs ${ARCHS:-9.0})"
NV_INC="$("$PY" -c "import glob, site; print(':'.join(i for sp in site.getsitepackages() for i in glob.glob(sp + '/nvidia/cu*/include')))")"
export CPATH="${NV_INC}${CPATH:+:$CPATH}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${ARCHS:-9.0}" MAX_JOBS="$(nproc)" UNILORA_PTXAS_VERBOSE=1
if ! "$PY" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"
  stamp "build failed"
  exit 1
fi
"$PY" -P -c "import json, unilora_kernels as u; print(json.dumps(u.build_info()['backends']))"

stamp "gpu tests"
# Tests use each kernel's default config (autotuning is exercised by its own test and by the
# benchmark, which checks every candidate's results before timing them).
UNILORA_TRITON_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-240}" "$PY" -P -m pytest -m gpu -q -ra -p no:cacheprovider tests \
  2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
stamp "benchmarks"
rm -rf /tmp/bench
timeout "${BENCH_TIMEOUT:-240}" "$PY" -P benchmarks/run.py --out /tmp/bench ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | grep -v "it/s\]" | tail -n 60
stamp "multi-adapter benchmark"
timeout "${MULTI_TIMEOUT:-120}" "$PY" -P benchmarks/multi_adapter_bench.py --out /tmp/bench/multi_adapter 2>&1 \
  | tee "$OUT/multi_adapter.log" | tail -n 30
tar czf "$OUT/bench.tgz" -C /tmp bench 2>/dev/null
stamp "done"
