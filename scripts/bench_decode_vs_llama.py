"""Decode speed of ONNX export folders against llama.cpp, in one process, interleaved.

`bench_runtime.py` runs each backend in its own process, one after the other, so on a
shared machine the load changes between them. Here llama.cpp and every export run in
the same process, round after round (prompt of `--prompt-tokens`, then `--decode-tokens`
greedy steps each), and each round's ratio compares engines that saw the same minute.
Prints per round and the median and range of each export's decode ratio to llama.cpp.

    python scripts/bench_decode_vs_llama.py --model GGUF --exports ONNX_INT4_DIR \
        --threads 1 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np


def _llama_decode(llm: Any, ids: list[int], n: int) -> float:
    llm.reset()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return time.perf_counter() - t0


def _runner_decode(runner: Any, ids: list[int], n: int) -> float:
    tok = int(runner.step(ids, 0).argmax())
    t0 = time.perf_counter()
    for i in range(n):
        tok = int(runner.step([tok], len(ids) + i).argmax())
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the GGUF file llama.cpp runs")
    p.add_argument("--exports", nargs="+", required=True, help="ONNX export folders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()

    from llama_cpp import Llama

    from exporters.runners import OnnxRunner

    llm = Llama(model_path=args.model, n_ctx=args.prompt_tokens + args.decode_tokens + 8,
                n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                verbose=False)
    runners = {d: OnnxRunner(d, threads=args.threads) for d in args.exports}
    ids = [(i * 37) % 4000 + 100 for i in range(args.prompt_tokens)]
    n = args.decode_tokens
    _llama_decode(llm, ids, 8)  # warm-up
    for r in runners.values():
        _runner_decode(r, ids, 8)
    ratios: dict[str, list[float]] = {d: [] for d in runners}
    for k in range(args.rounds):
        t_llama = _llama_decode(llm, ids, n)
        line = [f"round {k + 1}: llama.cpp {n / t_llama:.1f} tok/s"]
        for d, r in runners.items():
            t = _runner_decode(r, ids, n)
            ratios[d].append(t_llama / t)
            line.append(f"{d} {n / t:.1f} ({t_llama / t:.2f}x)")
        print(" | ".join(line), flush=True)
    for d, rs in ratios.items():
        print(f"{d}: decode vs llama.cpp, {args.threads} thread(s), median "
              f"{statistics.median(rs):.2f}x, range {min(rs):.2f}-{max(rs):.2f}x "
              f"over {len(rs)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
