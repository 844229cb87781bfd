#!/usr/bin/env bash
# Make .venv and install exitbench with its test extras.
# The pinned CPU torch wheel goes in first: a bare `torch` requirement can pull a
# multi-GB CUDA build. Set EXITBENCH_TORCH to pin another build (e.g. on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's chromium + chromium-driver for the leaderboard's browser test
# (tests/test_leaderboard_browser.py): installed when missing and running as root (CI is).
install_browser() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver (Debian packages) for the browser test"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
    else
        echo "warning: chromium/chromedriver not found; the leaderboard browser test will fail" \
             "until they are installed: sudo apt-get install chromium chromium-driver" >&2
    fi
}
if [ "${1:-}" = "--browser-only" ]; then
    install_browser
    exit 0
fi
install_browser
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
# Ray's train extra (ray[default,train] in pyproject.toml) carries `exitbench train --workers`.
"$VENV/bin/python" -c "import ray.train.torch" || { echo "ray[train] did not install" >&2; exit 1; }
echo "exitbench installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
