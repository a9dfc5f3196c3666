#!/usr/bin/env bash
# The GPU check of issue 8 (part 6): on a machine with an NVIDIA GPU, within 5 minutes,
#   1. the CUDA tests (tests/test_cuda.py: device-independent patterns, campaign on CUDA = on CPU,
#      batched patterns of a CNN on CUDA = the per-pattern loop),
#   2. the campaign benchmark on CUDA (per-pattern loop vs K = 4, 16 patterns per vmapped pass, for
#      an MLP and a CNN), printed as a markdown table for BENCHMARKS.md.
# Usage (repository root, environment installed with `pip install -c constraints.txt -e ".[test]"`
# and a CUDA build of torch):  bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
PYTHONPATH=src timeout 140 "$PY" benchmarks/bench_campaign.py --device cuda --quick --threads 4
