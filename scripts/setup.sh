#!/usr/bin/env bash
# Set up edge-runtime in ./.venv on a fresh machine: torch pinned FIRST (a free resolve
# pulls several GB of CUDA wheels), then the project with every extra, then Mosquitto.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--core]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${EDGE_RT_TORCH_VERSION:-2.13.0}"
EXTRAS="dev,export,plot,observe,flower,ray,dp,secagg"
[ "${1:-}" = "--core" ] && EXTRAS="dev"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi
"$PY" -m pip install -q -e ".[$EXTRAS]"
# torch must still be the pinned CPU build after the extras resolved.
"$PY" -c "import torch, sys; v = torch.__version__; print('torch', v, file=sys.stderr); sys.exit(v.split('+')[0] != '$TORCH_VERSION')"

# Mosquitto (the demo's broker and the broker tests), openssl (TLS tests) and Chromium (the
# status page is tested in a real headless browser).
if ! command -v mosquitto >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 \
    || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients openssl \
      chromium >/dev/null
  else
    echo "note: install mosquitto mosquitto-clients openssl chromium (sudo apt-get install ...) for the broker and status-page tests" >&2
  fi
fi
echo "edge-runtime is set up in $(pwd)/.venv (activate: . .venv/bin/activate)" >&2
