"""Benchmark eager generation: prefill (128 tokens) and decode tokens/s per base quantization.

Baseline in the same run: the fp32 base (`--quant none`). Each mode runs in its own
process so its peak RSS is its own.

    python scripts/bench_generate.py [--model smollm2-135m] [--decode 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def child(model: str, quant: str, prefill: int, decode: int, threads: int) -> dict:
    import torch

    from edge_runtime.checkpoints import load_model
    from edge_runtime.config import QuantMode
    from edge_runtime.quant import resident_bytes

    torch.set_num_threads(threads)
    loaded = load_model(model, QuantMode.parse(quant))
    m = loaded.model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, m.config.vocab_size - 100, (1, prefill), generator=g)
    with torch.no_grad():
        m.setup_cache(1, prefill + decode + 1)
        m(ids[:, :8], torch.arange(8))  # warm-up
        t = time.perf_counter()
        logits = m(ids, torch.arange(prefill))
        t_prefill = time.perf_counter() - t
        nxt = int(logits[0, -1].argmax())
        t = time.perf_counter()
        for i in range(decode):
            logits = m(torch.tensor([[nxt]]), torch.tensor([prefill + i]))
            nxt = int(logits[0, -1].argmax())
        t_decode = time.perf_counter() - t
    return {"quant": quant, "prefill_tok_s": prefill / t_prefill, "decode_tok_s": decode / t_decode,
            "weights_mb": resident_bytes(m) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.child, a.prefill, a.decode, a.threads)))
        return
    rows = []
    for quant in ("none", "int8", "int4"):
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--child", quant,
                              "--prefill", str(a.prefill), "--decode", str(a.decode),
                              "--threads", str(a.threads)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"eager torch, {a.model}, prefill {a.prefill} tokens, decode {a.decode} tokens, "
          f"{a.threads} threads; baseline = fp32 base")
    print(f"{'quant':<6} {'prefill tok/s':>14} {'decode tok/s':>13} {'x fp32':>7} "
          f"{'weights MB':>11} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['quant']:<6} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} "
              f"{r['decode_tok_s'] / base['decode_tok_s']:>7.2f} {r['weights_mb']:>11.0f} "
              f"{r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
