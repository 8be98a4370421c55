"""`edge-rt eval`'s one-pass evaluation against the straightforward scorer, same run.

The anchor is what the project did before: the held-out loss in batches of 8 with the
head on labelled positions (`losses.token_loss_sum`), then every choice of every row as
its own uncached forward over prompt + choice with the head on every position. Both
score the same rows on the same model and threads; the table gives loss, accuracy and
seconds of each, and the ratio.

    python scripts/bench_eval.py --model smollm2-135m --data sentiment --rows 200 [--adapter]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.checkpoints import load_model  # noqa: E402
from edge_runtime.config import LoRAPlan  # noqa: E402
from edge_runtime.data import Example, collate, format_prompt, load_jsonl, tokenize  # noqa: E402
from edge_runtime.evaluate import evaluate  # noqa: E402
from edge_runtime.lora import apply_lora  # noqa: E402
from edge_runtime.losses import token_loss_sum  # noqa: E402


@torch.no_grad()
def anchor(model, tok, rows: list[Example], seq_len: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    data = tokenize(tok, rows, seq_len)
    total, count = 0.0, 0
    for s in range(0, len(data), 8):
        loss, n = token_loss_sum(model, *collate(data[s: s + 8], tok.pad_id))
        total, count = total + float(loss), count + n
    correct = 0
    choice = [r for r in rows if r.choices is not None and r.answer is not None]
    for ex in choice:
        p_ids = tok.encode(format_prompt(tok, ex.prompt or ""))
        scores = []
        for c in ex.choices or []:
            c_ids = tok.encode(c)
            logp = F.log_softmax(model(torch.tensor([p_ids + c_ids]))[0].float(), -1)
            scores.append(sum(float(logp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == ex.answer)
    return total / count, correct / len(choice)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="sentiment", help="a JSONL file or a dataset name")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--adapter", action="store_true", help="a random rank-8 q,v adapter on")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.data)
    if not path.is_file():
        from edge_runtime.simulation import load_client_data

        _, test = load_client_data(args.data, 3, partition=None, alpha=0.5, seed=0)
        rows = test[: args.rows]
    else:
        rows = load_jsonl(path)[: args.rows]
    lm = load_model(args.model)
    if args.adapter:
        apply_lora(lm.model, LoRAPlan(rank=8, depth=lm.model.config.n_layers, targets=("q", "v")))
        gen = torch.Generator().manual_seed(0)
        for name, p in lm.model.named_parameters():
            if "lora_b" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    t0 = time.perf_counter()
    res = evaluate(lm.model, lm.tokenizer, rows, args.seq_len)
    t_new = time.perf_counter() - t0
    t0 = time.perf_counter()
    a_loss, a_acc = anchor(lm.model, lm.tokenizer, rows, args.seq_len)
    t_old = time.perf_counter() - t0
    out = {"model": args.model, "rows": len(rows), "adapter": args.adapter,
           "threads": torch.get_num_threads(),
           "evaluate": {"loss": res.loss, "accuracy": res.accuracy, "s": round(t_new, 2)},
           "anchor": {"loss": a_loss, "accuracy": a_acc, "s": round(t_old, 2)},
           "speed_up": round(t_old / t_new, 2)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
