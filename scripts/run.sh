#!/usr/bin/env bash
# Install from scratch (scripts/install.sh), then run the package's main job: the benchmarks
# against the naive PyTorch projection. Arguments go to benchmarks/run.py (e.g. --quick); a full
# run writes benchmarks/results/<device>/, a partial one (--quick, --candidates, ...) its partial/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/install.sh"
cd "$ROOT"
step "benchmarking Uni-LoRA layers and a small model (python benchmarks/run.py $*)"
"$VENV/bin/python" -P benchmarks/run.py "$@"
