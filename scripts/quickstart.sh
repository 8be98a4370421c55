#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the main job.
# Main job: pull the real SmolLM2-135M, fine-tune LoRA on a few rows, generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT="${1:-runs/quickstart}"
MODEL_PATH=$(edge-rt pull smollm2-135m)
echo "model: $MODEL_PATH" >&2
edge-rt train smollm2-135m --data tests/fixtures/qa.jsonl --rank 8 --depth 8 --targets q,v \
  --quant int8 --steps 10 --lr 1e-3 --batch-size 4 --seq-len 64 --out "$OUT/adapter"
edge-rt generate smollm2-135m --quant int8 --adapter "$OUT/adapter" \
  --prompt "What color is item 3?" --max-new-tokens 24
