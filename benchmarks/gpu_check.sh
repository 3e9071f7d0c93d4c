#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it measures and prints):
#   bash benchmarks/gpu_check.sh [--budget 400] [--sample DIR] [--device cpu --tiny]
# It needs only a python3 with torch, torchvision, numpy, pandas, pyarrow, scikit-learn and
# pillow: boatray comes from this checkout, Ray and PyYAML are used where they import.
# $PYTHON picks the interpreter (default python3). Everything stops after 8 minutes
# ($GPU_CHECK_TIMEOUT seconds: the CPU test of the check allows more on a loaded machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout --kill-after 15 "${GPU_CHECK_TIMEOUT:-480}" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
