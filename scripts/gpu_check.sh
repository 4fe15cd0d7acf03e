#!/usr/bin/env bash
# The GPU path end to end on one GPU (analysis/gpu_check.py holds the steps and their time limits): each step is
# stopped at its limit, so the check ends within 9 min, their sum (set on paper: no GPU has run it yet).
# A random-init Qwen2.5-0.5B-shaped model with the real Qwen tokenizer saved to a folder (nothing downloaded); the
# smoke experiment on it; the same with the 7B paper recipes' NF4 + paged_adamw_32bit + gradient checkpointing
# (Trainer, checkpoints, best adapter, 4-bit ranking); that run ranked again from a fresh NF4 base (the --resume
# build, same scores) and exported (merged into the dequantised NF4 weights); the benchmark.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (default OUT: runs/gpu_check, which must not hold anything).
#   bash setup.sh --gpu && bash scripts/gpu_check.sh [OUT]
# Exit 1 when a step fails, and at once when torch is built for CUDA but no device is usable (the cause and the
# driver named). A CPU-only torch skips the CUDA steps and runs the rest with the tiny-qwen2 shape (77 s measured
# on 2 cores), saying it checked no GPU. Python: $PYTHON, else .venv-gpu, else .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv-gpu/bin/python ]; then PY=.venv-gpu/bin/python; else PY=.venv/bin/python; fi
fi
[ -x "$PY" ] || { echo "gpu_check.sh: no Python at $PY: run bash setup.sh --gpu (or bash setup.sh for the CPU check)" >&2; exit 2; }
exec "$PY" -m analysis.gpu_check --out "${1:-runs/gpu_check}"
