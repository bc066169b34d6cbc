#!/usr/bin/env bash
# One command to set up a fresh machine: system libraries, the CPU build of torch, then
# this package with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # tcmalloc: torch is ~1.5x faster with it than with glibc malloc on this kind of VM.
    # chromium + driver: the browser the web-app tests drive (never downloaded by a tool).
    need=""
    for pkg in libtcmalloc-minimal4 chromium chromium-driver; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
    done
    if [ -n "$need" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    fi
fi

PY=${PYTHON:-python3}
# The pin comes first and stays: every later install is constrained to it, so nothing can
# swap in the multi-GB CUDA build.
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
# pyenv only sees new console scripts (the `segformer` command) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
"$PY" -c "import torch, segformer; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('segformer', segformer.__version__, 'with torch', torch.__version__)"
