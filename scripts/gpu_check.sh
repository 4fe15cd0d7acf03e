#!/usr/bin/env bash
# The GPU path end to end, in under 8 minutes on one GPU (analysis/gpu_check.py holds the steps):
# a random-init Qwen2.5-0.5B-shaped model with the real Qwen tokenizer saved to a folder (nothing downloaded),
# the smoke experiment on it in bf16, one NF4 + LoRA training step, one unsloth training step, and the benchmark.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (default OUT: runs/gpu_check, which must not hold anything).
#   bash setup.sh --gpu && bash scripts/gpu_check.sh [OUT]
# Without CUDA the CUDA-only steps say "skipped: no CUDA device" and the rest runs on CPU with the tiny-qwen2
# shape instead of 0.5B's (a few minutes on 2 cores). Python: $PYTHON, else .venv-gpu, else .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv-gpu/bin/python ]; then PY=.venv-gpu/bin/python; else PY=.venv/bin/python; fi
fi
[ -x "$PY" ] || { echo "gpu_check.sh: no Python at $PY: run bash setup.sh --gpu (or bash setup.sh for the CPU check)" >&2; exit 2; }
exec "$PY" -m analysis.gpu_check --out "${1:-runs/gpu_check}"
