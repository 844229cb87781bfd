#!/usr/bin/env bash
# Make .venv and install exitbench with its test extras.
# The pinned CPU torch wheel goes in first: a bare `torch` requirement can pull a
# multi-GB CUDA build. Set EXITBENCH_TORCH to pin another build (e.g. on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the suite uses outside Python, installed when missing and running as root
# (CI is): bubblewrap (bwrap), the sandbox submitted measures run in (suite/sandbox), and
# chromium + chromium-driver for the leaderboard's browser test.
install_debian_packages() {
    local missing=()
    command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        missing+=(chromium chromium-driver)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian packages: ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    else
        echo "warning: missing ${missing[*]}: submitted measures need bubblewrap (bwrap) and" \
             "the browser test needs chromium; install them: sudo apt-get install ${missing[*]}" >&2
    fi
}
if [ "${1:-}" = "--browser-only" ] || [ "${1:-}" = "--system-only" ]; then
    install_debian_packages
    exit 0
fi
install_debian_packages
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${EXITBENCH_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# -qq: pip's errors only (a machine's pip config can add a warning per package for index
# locations it lacks, which says nothing about this project)
"$VENV/bin/python" -m pip install -qq --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -qq "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -qq -e ".[test]"
# Ray's train extra (ray[default,train] in pyproject.toml) carries `exitbench train --workers`.
"$VENV/bin/python" -c "import ray.train.torch" || { echo "ray[train] did not install" >&2; exit 1; }
echo "exitbench installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
