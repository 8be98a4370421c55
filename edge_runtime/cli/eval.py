"""`edge-rt eval`: held-out loss (and multiple-choice accuracy) as JSON on stdout."""

from __future__ import annotations

import argparse
import json

from edge_runtime.cli.common import add_model_args, apply_adapter_dir, load_from_args, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out loss and choice accuracy, as JSON")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder to apply")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.data import load_jsonl
    from edge_runtime.evaluate import evaluate

    examples = load_jsonl(args.data)
    loaded = load_from_args(args)
    if args.adapter:
        apply_adapter_dir(loaded, args.adapter)
    res = evaluate(loaded.model, loaded.tokenizer, examples, args.seq_len, args.batch_size)
    result: dict = {
        "model": loaded.name,
        "adapter": args.adapter,
        "examples": len(examples),
        "loss": round(res.loss, 6),
    }
    if res.accuracy is not None:
        result["accuracy"] = round(res.accuracy, 6)
        result["choice_examples"] = res.choice_rows
    print(json.dumps(result))
    return 0
