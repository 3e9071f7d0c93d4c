#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it prints), on a machine with
# one NVIDIA GPU and the README's install:  bash benchmarks/gpu_check.sh [--sample DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 2; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no GPU')"
exec timeout 480 python benchmarks/gpu_check.py "$@"
