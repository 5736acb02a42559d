#!/usr/bin/env bash
# Install from scratch (scripts/install.sh), then run the package's main job.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/install.sh"
cd "$ROOT"
step "fine-tuning a tiny LLaMA with Uni-LoRA on CPU"
"$VENV/bin/python" -P examples/finetune_tiny.py "$@"
