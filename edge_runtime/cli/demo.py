"""`edge-rt demo`: broker, aggregator and N agent processes in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.cli.common import positive_float, positive_int
from edge_runtime.cli.run_args import DP_FLAGS, add_dp_args, add_run_file_args, resolve_run
from edge_runtime.config import Compression, StrategyName
from edge_runtime.errors import ConfigError

FLAGS = {"model": "model.name", "clients": "sim.clients", "rounds": "fleet.rounds",
         "data": "data.path", "partition": "data.partition", "eval_max": "data.eval_max",
         "strategy": "strategy.name", "local_steps": "train.steps",
         "round_timeout_s": "fleet.round_timeout_s", "compression": "fleet.compression",
         "seed": "seed", "sites": "sim.sites", **DP_FLAGS}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a whole federated fleet locally (start here)")
    add_run_file_args(p)
    p.add_argument("--model", help="tiny (default: instant, random) or smollm2-135m / a GGUF "
                   "path (real model)")
    p.add_argument("--clients", type=positive_int, help="agent processes (default 3)")
    p.add_argument("--rounds", type=positive_int)
    p.add_argument("--strategy", choices=[m.value for m in StrategyName])
    p.add_argument("--data", help="dataset name or `edge-rt data pull` folder (default: "
                   "sentiment, one review domain per device)")
    p.add_argument("--partition", help="when --data is a name: domain|task|dirichlet|iid")
    p.add_argument("--eval-max", type=positive_int, help="held-out rows scored each round "
                   "(default 100)")
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="metrics.json, adapter/, logs/ go here (default demo-out)")
    p.add_argument("--broker", metavar="URL",
                   help="use this MQTT broker (default: a Mosquitto started for the demo "
                   "when installed, else the embedded broker)")
    p.add_argument("--sites", type=positive_int, metavar="N",
                   help="a two-level fleet: N site Mosquittos bridged over TLS to a root "
                   "Mosquitto, a site aggregator each folding its devices' updates into "
                   "partial sums for the root (needs mosquitto; docs/SCALING.md)")
    p.add_argument("--http-port", type=int, default=0, metavar="PORT",
                   help="serve the fleet status page, status.json and Prometheus /metrics "
                   "on 127.0.0.1:PORT (default 0: a free port; -1: off)")
    p.add_argument("--http-linger-s", type=positive_float, default=None, metavar="S",
                   help="keep the status page up S seconds after the last round")
    p.add_argument("--local-steps", type=positive_int,
                   help="training steps per round (default 10 on tiny, 4 on a real model)")
    p.add_argument("--round-timeout-s", type=positive_float,
                   help="round deadline (default 60 s on tiny, 600 s on a real model)")
    p.add_argument("--compression", choices=[m.value for m in Compression])
    p.add_argument("--seed", type=int)
    add_dp_args(p)
    p.set_defaults(func=run)


def demo_base(model: str) -> dict[str, object]:
    """The demo's own starting values (below the run file and flags): a small, quick fleet
    of 3 devices; fewer local steps and a longer deadline on a real model."""
    tiny = model == "tiny"
    return {"sim.clients": 3, "train.steps": 10 if tiny else 4, "train.lr": 1e-3,
            "train.seq_len": 64, "fleet.round_timeout_s": 60.0 if tiny else 600.0,
            "fleet.wait_for_clients_s": 180.0, "data.path": "sentiment",
            "data.partition": "domain", "data.eval_max": 100}


def run(args: argparse.Namespace) -> int:
    import logging

    from edge_runtime.config import load_run_file
    from edge_runtime.fleet.demo import run_demo

    if not getattr(args, "verbose", False):  # the [demo] lines are the progress report
        logging.getLogger("edge_runtime").setLevel(logging.WARNING)
    model = args.model or (load_run_file(args.config).get("model", {}).get("name", "tiny")
                           if args.config else "tiny")
    if args.sites and args.broker:
        raise ConfigError("--sites starts its own brokers (a root and one per site); drop "
                          "--broker")
    base = demo_base(str(model)) | ({"sim.transport": "mqtt"} if args.sites else {})
    cfg = resolve_run(args, FLAGS, base=base)
    cfg.fleet.min_clients = cfg.sim.clients  # every demo device takes part in every round
    if args.http_port < -1 or args.http_port > 65535:
        raise ConfigError(f"--http-port must be a port, 0 (free port) or -1 (off), got "
                          f"{args.http_port}")
    run_demo(cfg, Path(args.out), broker_url=args.broker,
             join_timeout_s=cfg.fleet.wait_for_clients_s,
             http_port=None if args.http_port == -1 else args.http_port,
             http_linger_s=args.http_linger_s or 0.0)
    return 0
