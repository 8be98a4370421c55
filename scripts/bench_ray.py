"""Simulated devices on Ray actors against the local backend, same run, same machine.

The anchor is the local backend: devices trained one after another in this process with
torch using every core (the strongest single-process setting). The Ray backend trains
them on `--workers` actors of 1 thread each. Both run the same simulation (same seed,
same rounds: the test suite checks the metrics match); the table gives wall seconds of
the whole run (model loads included: each actor loads the model once) and the ratio.

    python scripts/bench_ray.py --model smollm2-135m --clients 4 --rounds 2 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.config import RunConfig  # noqa: E402
from edge_runtime.simulation import run_simulation  # noqa: E402


def config(args: argparse.Namespace, **sim: object) -> RunConfig:
    return RunConfig.from_dict({
        "seed": 0, "strategy": {"name": "hetlora"}, "model": {"name": args.model},
        "adapter": {"r_min": 2, "r_max": 8, "depth": args.depth},
        "train": {"steps": args.steps, "batch_size": 4, "seq_len": 64, "lr": 1e-3},
        "fleet": {"rounds": args.rounds, "fraction": 1.0},
        "data": {"path": args.data, "partition": "iid", "eval_max": 16},
        "sim": {"clients": args.clients, "device_classes": ["rpi5-4gb"], **sim}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="sentiment")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = []
    t = time.perf_counter()
    base = run_simulation(config(args))
    local_s = time.perf_counter() - t
    rows.append({"backend": f"local ({torch.get_num_threads()} threads)", "seconds": local_s,
                 "ratio": 1.0})
    for w in [int(x) for x in args.workers.split(",")]:
        t = time.perf_counter()
        m = run_simulation(config(args, backend="ray", ray_workers=w))
        s = time.perf_counter() - t
        same = all(abs(a["eval_loss"] - b["eval_loss"]) < 1e-5
                   for a, b in zip(base["rounds"], m["rounds"], strict=True))
        rows.append({"backend": f"ray, {w} workers x 1 thread", "seconds": s,
                     "ratio": local_s / s, "same_metrics": same})
    print(f"{args.clients} devices x {args.rounds} rounds x {args.steps} steps, "
          f"{args.model} depth {args.depth}; wall seconds of the whole run")
    print("| backend | seconds | speed-up vs local |\n|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['seconds']:.1f} | {r['ratio']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
