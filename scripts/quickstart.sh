#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the main job, the fleet demo:
# Mosquitto (started with a password per device and the per-device ACL; the embedded
# broker when Mosquitto is absent), a live status page, the aggregator and 3 device agents (3 declared device classes,
# each with its own LoRA rank and depth) federating LoRA on the real SmolLM2-135M.
# Usage: bash scripts/quickstart.sh [extra `edge-rt demo` flags, e.g. --strategy flexlora]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
edge-rt pull smollm2-135m >/dev/null
edge-rt demo --model smollm2-135m --clients 3 --rounds 3 --out runs/quickstart "$@"
echo "metrics: runs/quickstart/metrics.json, global adapter: runs/quickstart/adapter" >&2
