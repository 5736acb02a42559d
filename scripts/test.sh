#!/usr/bin/env bash
# Install from scratch (scripts/install.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k peft -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/install.sh"
cd "$ROOT"
step "running tests"
# -P: import the installed package, not the source tree (the Triton sources and the compiled
# extension only exist in the installed layout). pytest exits non-zero, also when it collects
# no test (exit code 5), and `set -e` passes that on.
"$VENV/bin/python" -P -m pytest -ra --durations=30 "$@"
