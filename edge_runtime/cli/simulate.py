"""`edge-rt simulate`: a simulated fleet trained with a strategy, in this process or through
an MQTT broker (`--transport mqtt`), by the same round engine as a real fleet.

Writes DIR/metrics.json (the one metrics schema: README, "Metrics"; record 0 is the base
model, time is simulated) and DIR/metrics.png when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from edge_runtime.cli.common import positive_float, positive_int
from edge_runtime.cli.run_args import (
    DP_FLAGS,
    PLAN_FLAGS,
    add_dp_args,
    add_plan_args,
    add_run_file_args,
    resolve_run,
)
from edge_runtime.config import Backend, Compression, QuantMode, StrategyName, Transport

__all__ = ["register", "run", "plot_metrics", "FLAGS"]

log = logging.getLogger(__name__)

# flag dest -> run config key
FLAGS = {
    "strategy": "strategy.name", "model": "model.name", "quant": "model.quant",
    "clients": "sim.clients", "rounds": "fleet.rounds", "data": "data.path",
    "partition": "data.partition", "alpha_dirichlet": "data.dirichlet_alpha",
    "fraction": "fleet.fraction", "dropout": "sim.dropout", "straggler": "sim.straggler",
    "classes": "sim.device_classes", **PLAN_FLAGS, "deadline": "sim.deadline_s", "eval_max": "data.eval_max", "seed": "seed",
    "transport": "sim.transport", "broker": "sim.broker", "backend": "sim.backend",
    "ray_address": "sim.ray_address", "ray_workers": "sim.ray_workers", "compression": "fleet.compression",
    "sites": "sim.sites",
    **DP_FLAGS,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="simulate a federated fleet (in-process or MQTT)",
                              description=__doc__)
    add_run_file_args(p)
    p.add_argument("--strategy", choices=[m.value for m in StrategyName])
    p.add_argument("--model", help="tiny | smollm2-135m | GGUF path | HF folder")
    p.add_argument("--quant", choices=[m.value for m in QuantMode], help="frozen base storage")
    p.add_argument("--clients", type=positive_int)
    p.add_argument("--rounds", type=positive_int)
    p.add_argument("--data", help="a folder from `edge-rt data pull` (client_*/train.jsonl, "
                   "test.jsonl) or a dataset name (sentiment, fortunes, chatterbot, "
                   "bigbench:T1,T2)")
    p.add_argument("--partition", help="when --data is a name: domain|task|dirichlet|iid")
    p.add_argument("--alpha-dirichlet", type=positive_float)
    p.add_argument("--fraction", type=float, help="share of devices selected per round")
    p.add_argument("--dropout", type=float, help="P(selected device never reports)")
    p.add_argument("--straggler", type=float, help="P(device computes 4x slower)")
    p.add_argument("--classes", help="declared device profiles (profiles/*.json), comma-separated")
    add_plan_args(p)
    p.add_argument("--deadline", type=positive_float, help="round deadline, simulated s")
    p.add_argument("--eval-max", type=positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--transport", choices=[m.value for m in Transport],
                   help="inproc (default), mqtt (the same fleet through a real broker) or "
                   "flower (Flower's simulation engine)")
    p.add_argument("--backend", choices=[m.value for m in Backend],
                   help="with --transport inproc: local (default) or ray (devices train on "
                   "Ray actors, the model loaded once per worker)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --backend ray: an existing Ray cluster (default: a local one)")
    p.add_argument("--ray-workers", type=positive_int, metavar="N",
                   help="with --backend ray: actors training devices (default 2)")
    p.add_argument("--broker", metavar="URL", help="with --transport mqtt: this broker "
                   "(default: one started for the run)")
    p.add_argument("--sites", type=positive_int, metavar="N",
                   help="with --transport mqtt: N site brokers bridged (TLS) to a root "
                   "broker, a site aggregator each, the root merging their partial sums")
    p.add_argument("--compression", choices=[m.value for m in Compression])
    add_dp_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run)


def plot_metrics(metrics: dict[str, Any], path: Path) -> bool:
    """Loss vs round, vs cumulative bytes, vs time. False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = metrics["rounds"]
    loss = [r["eval_loss"] for r in rows]
    cum, total = [], 0
    for r in rows:
        total += r["bytes_up"] + r["bytes_down"]
        cum.append(total / 1e6)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, x, label in zip(axes, ([r["round"] for r in rows], cum,
                                   [r["time_s"] for r in rows]),
                            ("round", "MB sent (up + down)", f"{metrics['clock']} time (s)"),
                            strict=True):
        ax.plot(x, loss, marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss")
    fig.suptitle(f"{metrics['strategy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    from edge_runtime.simulation import run_simulation

    cfg = resolve_run(args, FLAGS)
    metrics = run_simulation(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plotted = plot_metrics(metrics, args.out / "metrics.png")
    first, last = metrics["rounds"][0], metrics["rounds"][-1]
    up = sum(r["bytes_up"] for r in metrics["rounds"]) / 1e6
    print(f"{metrics['strategy']} ({cfg.sim.transport.value}): eval loss "
          f"{first['eval_loss']:.4f} -> {last['eval_loss']:.4f} in {cfg.fleet.rounds} rounds, "
          f"{up:.2f} MB up, {last['time_s']:.1f} s simulated -> {args.out / 'metrics.json'}"
          + ("" if plotted else " (no plot: pip install matplotlib)"))
    return 0
