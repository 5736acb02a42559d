#!/usr/bin/env bash
# The GPU checks in one command that ends within 9 minutes, for a CUDA machine with torch, triton
# and nvcc installed and no registry (the lent H200: 16 cores, torch 2.11, triton 3.6): build for
# sm_90, the `gpu`-marked tests, compute-sanitizer memcheck and racecheck over a short subset,
# then the layer, model and multi-adapter benchmarks. Each step has its own timeout (its budget,
# cut to what is left of TOTAL_BUDGET), so the whole run stays under it; a step that fails or
# times out marks the run failed (exit 1) and the next steps still run.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh                  # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 OUT=/tmp/dry bash scripts/gpu_check.sh   # the same script on a CPU machine
#
# The dry run builds nothing (the installed package is used), runs on CPU with the Triton
# interpreter at tiny sizes, logs "skipped: dry run" for the sanitizer steps, and writes the same
# files. $OUT gets 7 files: env.txt, steps.txt (one status line per step, then `result: ok|FAILED`),
# build.log, tests.log, sanitizer.log, bench.log and results.tgz (the benchmarks' csv/json/md).
# Knobs: PYTHON, ARCHS (9.0), TOTAL_BUDGET (seconds, 530), GPU_CHECK_STEPS (comma list: run only
# these steps), BENCH_ARGS (extra benchmarks/run.py arguments), B_<STEP> (a step's budget, s).
# Wheels of missing packages (peft, expecttest) are installed from .whl/ when it exists.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/build/gpu}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
export PY DRY  # read by the step functions, which run in a child bash
TOTAL="${TOTAL_BUDGET:-530}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES"
LOGS=(env.txt steps.txt build.log tests.log sanitizer.log bench.log)
for f in "${LOGS[@]}"; do : >"$OUT/$f"; done
export PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=6 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
FAILED=()
say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if [ "$DRY" = 1 ]; then
  # CPU only, even where a GPU is visible: the dry run checks the script, not the device.
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
fi

unselected() {  # unselected NAME: true (and said in steps.txt) when GPU_CHECK_STEPS leaves NAME out
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$1,"* ]]; then
    echo "step $1: skipped: not in GPU_CHECK_STEPS" >>"$OUT/steps.txt"
    return 0
  fi
  return 1
}

# step NAME BUDGET LOG CMD...: run CMD with a timeout of min(BUDGET, what is left), append its
# output to $OUT/LOG, and write one status line to steps.txt.
step() {
  local name="$1" budget="$2" log="$3"
  shift 3
  local var="B_${name//-/_}"
  budget="${!var:-$budget}"
  unselected "$name" && return 0
  local left=$(( TOTAL - ($(date +%s) - t0) - 10 ))  # 10 s kept for packing the results
  if [ "$left" -lt "$budget" ]; then budget=$left; fi
  if [ "$budget" -lt 5 ]; then
    echo "step $name: FAILED: no time left of TOTAL_BUDGET=${TOTAL}s" >>"$OUT/steps.txt"
    FAILED+=("$name")
    return 0
  fi
  say "step $name (budget ${budget}s)"
  echo "===== step $name: $* (budget ${budget}s)" >>"$OUT/$log"
  local s=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs programs, so a bash runs it
    timeout -k 5 "$budget" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" >>"$OUT/$log" 2>&1
  else
    timeout -k 5 "$budget" "$@" >>"$OUT/$log" 2>&1
  fi
  local rc=$? took=$(( $(date +%s) - s ))
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="FAILED: timed out after ${budget}s"
  elif [ "$rc" -ne 0 ]; then status="FAILED: exit code $rc"; fi
  echo "step $name: $status (${took}s of ${budget}s)" >>"$OUT/steps.txt"
  echo "===== step $name: $status (${took}s)" >>"$OUT/$log"
  if [ "$status" != ok ]; then
    FAILED+=("$name")
    tail -n 15 "$OUT/$log"
  fi
  say "step $name: $status"
}

skip() {  # skip NAME REASON LOG: a step that does not run, said in steps.txt and in its log
  echo "step $1: skipped: $2" >>"$OUT/steps.txt"
  echo "===== step $1: skipped: $2" >>"$OUT/$3"
  say "step $1: skipped: $2"
}

env_info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not found"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1 || echo "compute-sanitizer: not found"
  echo "cores: $(nproc)  dry run: $DRY"
  "$PY" -P - <<'PYEOF'
import json, sys
import torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())
for name in ("transformers", "peft"):
    try:
        print(name, __import__(name).__version__)
    except ImportError as e:
        print(name, "missing:", e)
import unilora_kernels as u
print(json.dumps(u.build_info()["backends"]))
PYEOF
}

build() {
  NV_INC="$("$PY" -c "import glob, site; print(':'.join(i for sp in site.getsitepackages() for i in glob.glob(sp + '/nvidia/cu*/include')))")"
  export CPATH="${NV_INC}${CPATH:+:$CPATH}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export TORCH_CUDA_ARCH_LIST="${ARCHS:-9.0}" MAX_JOBS="$(nproc)" UNILORA_PTXAS_VERBOSE=1 FORCE_CUDA=1
  "$PY" -m pip install --no-build-isolation --no-deps -v . &&
    "$PY" -P -c "import json, unilora_kernels as u; b = u.build_info()['backends']; print(json.dumps(b)); assert b['cuda'] == 'available', b['cuda']"
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# Budgets (seconds): 20 + 170 + 85 + 30 + 20 + 45 + 80 + 40 + 25 = 515, + 10 for packing, under
# TOTAL_BUDGET=530 < 540 = 9 minutes (a step killed at its limit has 5 s more to exit).
step env 20 env.txt env_info
cat "$OUT/env.txt"
if [ "$DRY" = 1 ]; then
  skip build "dry run (the installed package is used: $("$PY" -P -c 'import unilora_kernels as u, os; print(os.path.dirname(u.__file__))' 2>&1))" build.log
else
  step build 170 build.log build
fi

# Tests run each kernel's default config (autotuning has its own test and runs in the benchmarks).
export UNILORA_TRITON_AUTOTUNE=0
PYTEST=("$PY" -P -m pytest -m gpu -q -ra -p no:cacheprovider)
XDIST=()  # 4 workers share the GPU: the gpu tests' time is mostly Triton compiling on the CPU (119 s serial, H100)
"$PY" -c "import xdist" 2>/dev/null && [ "$DRY" != 1 ] && XDIST=(-n 4)
# (in the dry run every gpu test is collected and skips: the files import, the command works)
step gpu-tests 85 tests.log "${PYTEST[@]}" "${XDIST[@]}" tests

# compute-sanitizer: the CUDA C++ kernels (decode, mixed batch: the ones with shared memory) on
# small shapes; no caching allocator, so an out-of-bounds access is outside any allocation.
T_DECODE=tests/test_extension_cuda.py::test_decode_kernel_equals_cublas_path_and_is_reproducible
T_MIXED=tests/test_mixed_extension.py::test_cuda_decode_and_prefill_match_cpu
T_FOLD=tests/test_extension_cuda.py::test_fold_schedule_matches_oracle  # cuda_fold.cu's kernel
MEMCHECK_TESTS="${MEMCHECK_TESTS:-$T_DECODE[1] $T_DECODE[7] $T_MIXED[uniform] tests/test_extension_cuda.py::test_deterministic_scatter_is_bitwise_the_cpu_scatter $T_FOLD[uniform-torch.bfloat16-conv1d]}"
RACECHECK_TESTS="${RACECHECK_TESTS:-$T_DECODE[7] $T_MIXED[uniform]}"
read -r -a MEM <<<"$MEMCHECK_TESTS"  # into arrays: the node ids' [..] must not glob
read -r -a RACE <<<"$RACECHECK_TESTS"
if [ "$DRY" = 1 ]; then
  # Not run, but the node ids must exist: a renamed test fails here, not on the GPU.
  for tool in memcheck racecheck; do
    unselected "$tool" && continue
    if [ "$tool" = memcheck ]; then ids=("${MEM[@]}"); else ids=("${RACE[@]}"); fi
    found=$("$PY" -P -m pytest -m gpu --collect-only -q -p no:cacheprovider "${ids[@]}" 2>&1)
    echo "$found" >>"$OUT/sanitizer.log"
    # each id collected, and gpu-marked (a deselected one would not run under -m gpu)
    if [ "$(echo "$found" | grep -oE '^[0-9]+ tests? collected' | grep -oE '^[0-9]+')" = "${#ids[@]}" ]; then
      skip "$tool" "dry run (would run: compute-sanitizer --tool $tool over ${ids[*]}: they collect)" sanitizer.log
    else
      echo "step $tool: FAILED: not every one of its tests collects as a gpu test: ${ids[*]}" >>"$OUT/steps.txt"
      FAILED+=("$tool")
    fi
  done
else
  step memcheck 30 sanitizer.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 "${PYTEST[@]}" -x "${MEM[@]}"
  step racecheck 20 sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    "${PYTEST[@]}" -x "${RACE[@]}"
fi

unset UNILORA_TRITON_AUTOTUNE  # the benchmarks run the package's defaults
if [ "$DRY" = 1 ]; then
  LAYER=(--tiny --quick --cpu --no-host --no-model --min-time 0.01 --no-memory)
  MODEL=(--tiny --cpu)
  MULTI=(--tiny --cpu --min-time 0.05)
else
  # the issue's large-M layer shapes at M = 8192, device_ms beside wall time;
  # the naive projection is built (every candidate's check) but not timed: at M = 8192 it costs the most
  LAYER=(--quick --no-host --no-model --shapes 4096x4096,4096x11008 --ds 23040 --ms 8192 --time-budget 35
         --candidates base peft-unilora peft-lora "unilora[triton]" "unilora[cuda]")
  MODEL=(--quick)
  MULTI=(--quick)
fi
# shellcheck disable=SC2086  # BENCH_ARGS: extra words on purpose
step layer-bench 45 bench.log "$PY" -P benchmarks/run.py --out "$RES/layer" "${LAYER[@]}" ${BENCH_ARGS:-}
step model-bench 80 bench.log "$PY" -P benchmarks/model_bench.py --out "$RES/model" "${MODEL[@]}" \
  --jobs train,decode,decode-graphs
# compiling costs the most: one candidate (its PEFT counterpart is built only for the check)
step model-compiled 40 bench.log "$PY" -P benchmarks/model_bench.py --out "$RES/model_compiled" "${MODEL[@]}" \
  --jobs train-compiled --candidates "unilora[auto]"
step multi-bench 25 bench.log "$PY" -P benchmarks/multi_adapter_bench.py --out "$RES/multi_adapter" "${MULTI[@]}"

# Results: csv/json/md/txt only (plots stay out: 8 files of 16 MiB at most come back).
(cd "$WORK" && find results -type f \( -name '*.csv' -o -name '*.json' -o -name '*.md' -o -name '*.txt' \) -print0 \
  | tar czf "$OUT/results.tgz" --null -T -)
elapsed=$(( $(date +%s) - t0 ))
rm -rf "$WORK"
if [ "${#FAILED[@]}" -eq 0 ]; then
  echo "result: ok (${elapsed}s, dry run: $DRY)" >>"$OUT/steps.txt"
else
  echo "result: FAILED (${FAILED[*]}; ${elapsed}s, dry run: $DRY)" >>"$OUT/steps.txt"
fi
cat "$OUT/steps.txt"
[ "${#FAILED[@]}" -eq 0 ]
