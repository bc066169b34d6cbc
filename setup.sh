#!/usr/bin/env bash
# One command to set up a fresh machine: system libraries, the CPU build of torch, then
# this package with its test tools. Safe to run again.
#
# Python packages go into the interpreter named by $PYTHON, else `python3` — the active
# virtual environment's when one is activated (python3 -m venv .venv && . .venv/bin/activate).
set -euo pipefail
cd "$(dirname "$0")"

TORCH="2.13.0"
PY=${PYTHON:-python3}
# Seconds to wait for another apt/dpkg process (unattended upgrades, a second set-up) to
# release the package database before giving up.
LOCK_WAIT=${APT_LOCK_WAIT:-300}

step() { printf 'setup: %s\n' "$*"; }
fail() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY' (set PYTHON=/path/to/python3)"
step "using $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    step "no virtual environment active: installing into that interpreter's own site-packages"
fi

apt() {
    # apt waits for the dpkg lock instead of failing at once when another process holds it.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$LOCK_WAIT" "$@"
}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # tcmalloc: torch is ~1.5x faster with it than with glibc malloc on this kind of VM.
    # chromium + driver: the browser the web-app tests drive (never downloaded by a tool).
    need=""
    for pkg in libtcmalloc-minimal4 chromium chromium-driver; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
    done
    if [ -n "$need" ]; then
        step "installing system packages:$need (apt; waits up to ${LOCK_WAIT}s for the dpkg lock)…"
        log=$(mktemp)
        # shellcheck disable=SC2086  # $need is a list of package names
        if ! { apt update -qq && apt install -y -qq $need; } >"$log" 2>&1; then
            if grep -qi "lock" "$log"; then
                fail "another apt/dpkg process still holds the package lock after ${LOCK_WAIT}s; wait for it to finish (ps aux | grep -E 'apt|dpkg') and run bash setup.sh again, or set APT_LOCK_WAIT=<seconds>"
            fi
            fail "apt could not install$need: $(grep -E '^(E|Err):' "$log" | head -1 || tail -1 "$log")"
        fi
        rm -f "$log"
    else
        step "system packages already installed (libtcmalloc-minimal4 chromium chromium-driver)"
    fi
else
    step "skipping system packages (needs apt-get and root): tcmalloc and chromium are optional; the browser test skips without chromium"
fi

pip() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
# The pin comes first and stays: every later install is constrained to it, so nothing can
# swap in the multi-GB CUDA build.
step "installing torch $TORCH (CPU)… (a minute or more on a fresh machine)"
pip "torch==$TORCH"
step "installing segformer and its test tools (pip install -e .[test], constrained to torch $TORCH)…"
pip -c constraints.txt -e ".[test]"
# pyenv only sees new console scripts (the `segformer` command) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
step "checking the installation…"
"$PY" -c "import torch, segformer; assert torch.__version__.startswith('$TORCH'), torch.__version__; print('setup: done: segformer', segformer.__version__, 'with torch', torch.__version__)"
