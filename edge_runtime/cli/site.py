"""`edge-rt site`: a site aggregator of a two-level fleet (docs/SCALING.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_runtime.cli.common import positive_float
from edge_runtime.cli.fleet_common import MQTT_FLAGS, add_mqtt_args
from edge_runtime.cli.run_args import add_run_file_args, resolve_run

log = logging.getLogger("edge_runtime.site")

FLAGS = {**MQTT_FLAGS, "max_update_norm": "fleet.max_update_norm"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="run a site aggregator: fold this site's device updates "
                       "into partial sums for the root aggregator")
    add_mqtt_args(p, required=True)
    add_run_file_args(p)
    p.add_argument("--site-id", required=True,
                   help="this site's id: its bridge's username on the root broker")
    p.add_argument("--state", required=True, metavar="DIR",
                   help="state directory (accepted updates, unacked partials; resumed)")
    p.add_argument("--max-update-mb", type=positive_float)
    p.add_argument("--max-update-norm", type=positive_float)
    p.add_argument("--flush-s", type=positive_float, default=2.0,
                   help="forward what the site holds after this long without a new update "
                   "(default 2)")
    p.add_argument("--margin-s", type=positive_float, default=5.0,
                   help="forward at the latest this long before the root's deadline "
                   "(default 5)")
    p.add_argument("--timeout-s", type=positive_float, default=7 * 24 * 3600.0,
                   help="stop after this long (default a week)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.fleet.site import SiteNode
    from edge_runtime.rounds.site import SiteService

    if args.max_update_mb is not None:
        args.set = [f"fleet.max_update_bytes={int(args.max_update_mb * (1 << 20))}", *args.set]
    cfg = resolve_run(args, FLAGS)
    svc = SiteService(args.site_id, cfg.fleet, None, Path(args.state))
    node = SiteNode(svc, cfg.mqtt, margin_s=args.margin_s, flush_s=args.flush_s)
    print(f"site {args.site_id}: following the root's rounds on {cfg.mqtt.url}",
          file=sys.stderr, flush=True)
    sent = node.run(args.timeout_s)
    log.info("site %s done: %d partial sums sent; rejected %s", args.site_id, sent,
             dict(svc.rejected))
    return 0
