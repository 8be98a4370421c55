"""All five strategies and homogeneous LoRA at r_min and r_max on the same simulated fleet.

Same model, data split, device classes, seeds and local steps for every run; only the
strategy (and for the homogeneous baselines the rank) changes. The target loss is set
after the runs: halfway from the base loss to the best final loss of any run. Table:
final held-out loss, bytes (up + down) to reach the target, simulated time to target.

    python scripts/bench_fleet.py --model smollm2-135m --data sentiment --clients 8 \
        --rounds 4 --local-steps 4 --out /tmp/bench_fleet
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_runtime.config import RunConfig  # noqa: E402
from edge_runtime.simulation import run_simulation  # noqa: E402

CLASSES = ("rpi4-2gb", "rpi5-4gb", "android-mid-6gb", "android-flagship-12gb")


def _to_target(rounds: list[dict], target: float) -> tuple[float | None, float | None]:
    sent = 0.0
    for r in rounds:
        sent += r["bytes_up"] + r["bytes_down"]
        if r["eval_loss"] <= target:
            return sent, r["time_s"]
    return None, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="sentiment")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r-min", type=int, default=4)
    ap.add_argument("--r-max", type=int, default=32)
    ap.add_argument("--eval-max", type=int, default=48)
    ap.add_argument("--runs", default="fedavg-rmin,fedavg-rmax,hetlora,flexlora,sa-fedlora,legend")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table-only", action="store_true",
                    help="print the table from the run JSONs already in --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if args.table_only:
        for run in args.runs.split(","):
            path = args.out / f"{run}.json"
            if path.is_file():
                results[run] = json.loads(path.read_text())
        _table(results, args)
        return 0
    for run in args.runs.split(","):
        strategy, r_max = run, args.r_max
        if run == "fedavg-rmin":
            strategy, r_max = "fedavg", args.r_min
        elif run == "fedavg-rmax":
            strategy = "fedavg"
        cfg = RunConfig.from_dict({
            "model": {"name": args.model}, "strategy": {"name": strategy},
            "adapter": {"r_min": min(args.r_min, r_max), "r_max": r_max, "depth": 0},
            "train": {"steps": args.local_steps, "lr": args.lr, "batch_size": args.batch_size,
                      "seq_len": args.seq_len},
            "fleet": {"rounds": args.rounds},
            "data": {"path": args.data, "partition": args.partition, "eval_max": args.eval_max},
            "sim": {"clients": args.clients, "device_classes": list(CLASSES)}})
        t0 = time.monotonic()
        m = run_simulation(cfg)
        m["wall_s"] = time.monotonic() - t0
        results[run] = m
        (args.out / f"{run}.json").write_text(json.dumps(m, indent=1) + "\n")
    _table(results, args)
    return 0


def _table(results: dict[str, dict], args: argparse.Namespace) -> None:
    base = next(iter(results.values()))["rounds"][0]["eval_loss"]
    best = min(m["rounds"][-1]["eval_loss"] for m in results.values())
    target = base - 0.5 * (base - best)
    print(f"\n{args.model}, {args.data}, {args.clients} clients over {len(CLASSES)} classes, "
          f"{args.rounds} rounds x {args.local_steps} local steps; base loss {base:.4f}, "
          f"target {target:.4f}\n")
    print("| run | final loss | MB to target | sim. time to target (s) | total MB | "
          "total sim. time (s) | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for run, m in results.items():
        b, t = _to_target(m["rounds"], target)
        tot = sum(r["bytes_up"] + r["bytes_down"] for r in m["rounds"]) / 1e6
        print(f"| {run} | {m['rounds'][-1]['eval_loss']:.4f} | "
              f"{'-' if b is None else f'{b / 1e6:.1f}'} | {'-' if t is None else f'{t:.0f}'} | "
              f"{tot:.1f} | {m['rounds'][-1]['time_s']:.0f} | {m['wall_s']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
