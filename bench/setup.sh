#!/usr/bin/env bash
# Install what bench/ needs and build the compiled load client. Idempotent.
#
#   bench/setup.sh                 into the active venv (or the repo's .venv)
#   BENCH_VENV=bench/.venv bench/setup.sh   into a venv of its own
#
# Installs: npm ws, ioredis, bun (the npm package ships the binary) into
# bench/node_modules; pip websockets, matplotlib, cython, picows, uvloop,
# numpy into the venv; then builds bench/loadgen/_client (Cython).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

if [[ -n "${BENCH_VENV:-}" ]]; then
    [[ -x "$BENCH_VENV/bin/python" ]] || python3 -m venv "$BENCH_VENV"
    py="$BENCH_VENV/bin/python"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    py="$VIRTUAL_ENV/bin/python"
elif [[ -x "$root/.venv/bin/python" ]]; then
    py="$root/.venv/bin/python"
else
    py="$(command -v python3)"
fi
echo "bench setup: python $("$py" -c 'import sys; print(sys.executable)')"

# Python side: the peers' and the load client's deps. picows stays at the
# version the gateway pins, when the gateway is installed.
pip_pkgs=("websockets>=13" "matplotlib>=3.8" "cython>=3.0.10,<3.4" "uvloop>=0.19" "numpy>=1.26"
          "setuptools>=69")
if ! "$py" -c 'import picows' 2>/dev/null; then
    pip_pkgs+=("picows==2.3.1")
fi
missing=()
for spec in "${pip_pkgs[@]}"; do
    mod="${spec%%[<>=]*}"
    [[ "$mod" == "cython" ]] && mod=Cython
    "$py" -c "import $mod" 2>/dev/null || missing+=("$spec")
done
if ((${#missing[@]})); then
    "$py" -m pip install -q "${missing[@]}"
fi

# Node side: ws, ioredis and bun, pinned in bench/package.json.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "bench setup: node/npm not found; the node_ws and bun peers will be skipped" >&2
else
    cd "$here"
    if [[ ! -x node_modules/.bin/bun || ! -d node_modules/ws || ! -d node_modules/ioredis ]]; then
        if [[ -f package-lock.json ]]; then
            npm ci --no-audit --no-fund --loglevel=error
        else
            npm install --no-audit --no-fund --loglevel=error
        fi
    fi
    if ! node_modules/.bin/bun --version >/dev/null 2>&1; then
        # the bun package's postinstall picks the platform binary; run it if npm skipped it
        (cd node_modules/bun && node install.js) || true
    fi
    echo "bench setup: node $(node --version), bun $(node_modules/.bin/bun --version 2>/dev/null || echo missing)"
fi

# The compiled load client.
cd "$root"
so=$(ls bench/loadgen/_client*.so 2>/dev/null | head -1 || true)
if [[ -z "$so" || bench/loadgen/_client.pyx -nt "$so" ]]; then
    "$py" -m bench.loadgen.build
fi
"$py" -c 'import bench.loadgen._client' && echo "bench setup: load client built"
