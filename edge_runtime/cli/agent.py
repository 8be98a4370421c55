"""`edge-rt agent`: a device joins the fleet, trains each round it is picked for, uploads."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from edge_runtime.cli.common import positive_float, positive_int
from edge_runtime.cli.fleet_common import add_mqtt_args, mqtt_from_args
from edge_runtime.config import QuantMode
from edge_runtime.errors import ConfigError

log = logging.getLogger("edge_runtime.agent")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run a fleet device: train rounds, exchange adapters")
    add_mqtt_args(p, required=True)
    p.add_argument("--device-id", required=True, help="unique device id ([A-Za-z0-9_.-])")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="local training rows")
    p.add_argument("--model", default="tiny",
                   help="GGUF file, HF folder, pulled name (smollm2-135m) or 'tiny'")
    p.add_argument("--quant", default="none", choices=[m.value for m in QuantMode])
    p.add_argument("--profile", metavar="FILE", help="device profile JSON sent at register")
    p.add_argument("--device-class", default="", help="e.g. pi4, pi5, phone (plan fallback)")
    p.add_argument("--state", default=None, metavar="DIR",
                   help="outbox directory (default .edge-rt-agent/DEVICE_ID)")
    p.add_argument("--out", metavar="DIR", help="save the final global adapter here")
    p.add_argument("--compression", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--chunk-size", type=positive_int, default=64 * 1024)
    p.add_argument("--ack-timeout-s", type=positive_float, default=10.0)
    p.add_argument("--uplink-kbps", type=float, default=0.0,
                   help="emulate a slow uplink (kilobytes/s; 0 = unlimited)")
    p.add_argument("--connect-timeout-s", type=positive_float, default=None,
                   help="give up if the broker stays unreachable this long (default: never)")
    p.add_argument("--keep-running", action="store_true",
                   help="stay in the fleet after the aggregator finishes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.config import AgentConfig
    from edge_runtime.fleet.agent import DeviceAgent

    profile: dict = {}
    if args.profile:
        path = Path(args.profile)
        try:
            profile = dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"profile {path} does not exist; run `edge-rt profile` or "
                              "drop --profile") from None
        except (ValueError, TypeError):
            raise ConfigError(f"profile {path} is not a JSON object; regenerate it with "
                              "`edge-rt profile`") from None
    device_class = args.device_class or str(profile.get("device_class", ""))
    cfg = AgentConfig(
        device_id=args.device_id, data=Path(args.data), model=args.model,
        state_dir=Path(args.state or f".edge-rt-agent/{args.device_id}"), profile=profile,
        device_class=device_class, quant=args.quant, compression=args.compression,
        chunk_size=args.chunk_size, ack_timeout_s=args.ack_timeout_s,
        uplink_bytes_per_s=args.uplink_kbps * 1000.0,
        out=Path(args.out) if args.out else None, exit_when_done=not args.keep_running,
        connect_timeout_s=args.connect_timeout_s)
    agent = DeviceAgent(cfg, mqtt_from_args(args))
    n = agent.run()
    log.info("%s: done, trained %d rounds", args.device_id, n)
    return 0
