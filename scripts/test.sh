#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check edge_runtime exporters tests scripts
mypy edge_runtime exporters
python -m pytest -q -p no:cacheprovider "$@"
