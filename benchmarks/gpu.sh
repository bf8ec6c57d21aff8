#!/usr/bin/env bash
# The GPU run, in one command (at most 8 minutes on one H100/H200-class GPU):
#   bash benchmarks/gpu.sh [--out benchmarks/results/gpu.json]
# 1. the CUDA-only tests (they skip on machines without CUDA);
# 2. benchmarks/gpu.py: every method's CUDA path on a 7B-shaped layer subset generated on
#    the GPU, exact and randomized SVD timings, float32 and bf16 agreement with the CPU;
#    one table, to paste into docs/performance.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: no CUDA GPU visible to torch")'
cd "$root"
timeout 120 "$python" -m pytest -q tests/methods/test_cuda_path.py
cd "$root/benchmarks"
exec timeout 330 "$python" gpu.py "$@"
