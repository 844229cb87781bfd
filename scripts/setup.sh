#!/usr/bin/env bash
# Make .venv and install exitbench with its test extras.
# The pinned CPU torch wheel goes in first: a bare `torch` requirement can pull a
# multi-GB CUDA build. Set EXITBENCH_TORCH to pin another build (e.g. on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${EXITBENCH_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "exitbench installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
