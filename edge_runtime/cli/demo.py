"""`edge-rt demo`: broker, aggregator and N agent processes in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.cli.common import positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a whole federated fleet locally (start here)")
    p.add_argument("--model", default="tiny",
                   help="tiny (instant, random) or smollm2-135m / a GGUF path (real model)")
    p.add_argument("--clients", type=positive_int, default=3, help="agent processes")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--strategy", default="hetlora",
                   choices=["fedavg", "hetlora", "flexlora", "sa-fedlora", "legend"])
    p.add_argument("--out", default="demo-out", metavar="DIR",
                   help="metrics.json, adapter/, logs/ go here (default demo-out)")
    p.add_argument("--broker", metavar="URL",
                   help="use this MQTT broker instead of the embedded one")
    p.add_argument("--local-steps", type=positive_int, default=None,
                   help="training steps per round (default 10 on tiny, 4 on a real model)")
    p.add_argument("--round-timeout-s", type=positive_float, default=None,
                   help="round deadline (default 60 s on tiny, 600 s on a real model)")
    p.add_argument("--compression", default="fp32", choices=["fp32", "fp16", "int8"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from edge_runtime.fleet.demo import DemoConfig, run_demo

    if not getattr(args, "verbose", False):  # the [demo] lines are the progress report
        logging.getLogger("edge_runtime").setLevel(logging.WARNING)

    tiny = args.model == "tiny"
    cfg = DemoConfig(model=args.model, clients=args.clients, rounds=args.rounds,
                     strategy=args.strategy, out=Path(args.out), broker=args.broker,
                     local_steps=args.local_steps or (10 if tiny else 4),
                     round_timeout_s=args.round_timeout_s or (60.0 if tiny else 600.0),
                     compression=args.compression)
    run_demo(cfg)
    return 0
