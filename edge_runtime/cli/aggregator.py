"""`edge-rt aggregator`: announce rounds, validate and merge device updates over MQTT."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_runtime.cli.common import positive_float, positive_int
from edge_runtime.cli.fleet_common import MQTT_FLAGS, add_mqtt_args
from edge_runtime.cli.run_args import (
    DP_FLAGS,
    PLAN_FLAGS,
    add_dp_args,
    add_plan_args,
    add_run_file_args,
    resolve_run,
)
from edge_runtime.config import Compression, QuantMode, StrategyName
from edge_runtime.errors import ConfigError

log = logging.getLogger("edge_runtime.aggregator")

# flag dest -> run config key (shared with `edge-rt demo` where the flag exists there)
ROUND_FLAGS = {
    "strategy": "strategy.name", "rounds": "fleet.rounds",
    "round_timeout_s": "fleet.round_timeout_s", "model": "model.name", "quant": "model.quant",
    **PLAN_FLAGS, "compression": "fleet.compression", "chunk_size": "fleet.chunk_size",
    "max_update_norm": "fleet.max_update_norm", "seed": "seed", **DP_FLAGS,
}
FLAGS = {**ROUND_FLAGS, **MQTT_FLAGS, "min_clients": "fleet.min_clients",
         "max_clients": "fleet.max_clients", "fraction": "fleet.fraction",
         "wait_for_clients_s": "fleet.wait_for_clients_s", "sites": "fleet.serve_sites",
         "eval": "data.eval",
         "eval_max": "data.eval_max"}


def add_round_args(p: argparse.ArgumentParser) -> None:
    """Round and plan flags (all optional: defaults live in the run config)."""
    add_run_file_args(p)
    p.add_argument("--strategy", choices=[m.value for m in StrategyName])
    p.add_argument("--rounds", type=positive_int)
    p.add_argument("--round-timeout-s", type=positive_float)
    p.add_argument("--model", help="GGUF file, HF folder, pulled name (smollm2-135m) or 'tiny'")
    p.add_argument("--quant", choices=[m.value for m in QuantMode])
    add_plan_args(p)
    p.add_argument("--compression", choices=[m.value for m in Compression])
    p.add_argument("--chunk-size", type=positive_int)
    p.add_argument("--max-update-mb", type=positive_float)
    p.add_argument("--max-update-norm", type=positive_float)
    p.add_argument("--seed", type=int)
    add_dp_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregator", help="run the fleet aggregator (rounds over MQTT)")
    add_mqtt_args(p, required=False)
    add_round_args(p)
    p.add_argument("--min-clients", type=positive_int)
    p.add_argument("--max-clients", type=int, help="per round (0 = all online)")
    p.add_argument("--fraction", type=float, help="share of online devices selected per round")
    p.add_argument("--wait-for-clients-s", type=positive_float)
    p.add_argument("--sites", action="store_const", const=True,
                   help="serve site aggregators (`edge-rt site`) too: publish the whole "
                   "global adapter each round and merge their partial sums")
    p.add_argument("--state", required=True, metavar="DIR",
                   help="state directory (resumed if it exists)")
    p.add_argument("--eval", metavar="FILE.jsonl", help="held-out rows for eval_loss per round")
    p.add_argument("--eval-max", type=positive_int)
    p.add_argument("--profiles", metavar="DIR",
                   help="declared device-class profiles (<class>.json; default: profiles/)")
    p.add_argument("--reference-profile", metavar="FILE",
                   help="a profile measured with `edge-rt profile` for this model: plans "
                   "declared classes with the profiler's cost model")
    p.add_argument("--out", metavar="DIR", help="write the final global adapter here")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads for merging (raise for big FlexLoRA SVDs)")
    p.add_argument("--metrics", metavar="FILE",
                   help="write metrics JSON here (default STATE/metrics.json)")
    p.add_argument("--http-port", type=int, metavar="PORT",
                   help="serve the fleet status page (/), /status.json and Prometheus "
                   "/metrics on this port (0: a free one; default: off)")
    p.add_argument("--http-host", default="127.0.0.1", metavar="ADDR",
                   help="address the status page binds (default 127.0.0.1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.checkpoints import load_model
    from edge_runtime.data import load_jsonl
    from edge_runtime.fleet.agent import save_final
    from edge_runtime.fleet.server import AggregatorNode
    from edge_runtime.profiler.profile_io import load_profile
    from edge_runtime.rounds.build import build_service, make_evaluator

    if args.max_update_mb is not None:  # a flag in MB for the config's bytes
        args.set = [f"fleet.max_update_bytes={int(args.max_update_mb * (1 << 20))}", *args.set]
    run_cfg = resolve_run(args, FLAGS)
    if run_cfg.mqtt.url == "mqtt://127.0.0.1:1883" and args.broker is None and not args.config:
        raise ConfigError("no broker: pass --broker mqtt://HOST:PORT (or set mqtt.url in "
                          "--config)")
    loaded = load_model(run_cfg.model.name, run_cfg.model.quant)
    evaluator = None
    if run_cfg.data.eval:
        rows = load_jsonl(run_cfg.data.eval)[: run_cfg.data.eval_max]
        evaluator = make_evaluator(loaded, rows, run_cfg.train.seq_len)
    svc = build_service(loaded, run_cfg, Path(args.state), evaluator=evaluator,
                        profiles_dir=Path(args.profiles) if args.profiles else None,
                        reference=load_profile(args.reference_profile)
                        if args.reference_profile else None)

    def progress(rec) -> None:  # type: ignore[no-untyped-def]
        print(f"round {rec.round}: {rec.participants} updates, eval_loss {rec.eval_loss}, "
              f"up {rec.bytes_up} B, down {rec.bytes_down} B, {rec.time_s:.1f} s, "
              f"rejected {rec.rejected}", file=sys.stderr, flush=True)

    node = AggregatorNode(svc, run_cfg.mqtt, on_round=progress,
                          wait_for_clients_s=run_cfg.fleet.wait_for_clients_s,
                          threads=args.threads, sites=run_cfg.fleet.serve_sites)
    web = None
    if args.http_port is not None:
        from edge_runtime.observe.http import ObserveServer

        if not 0 <= args.http_port <= 65535:
            raise ConfigError(f"--http-port must be 0-65535, got {args.http_port}")
        web = ObserveServer(svc, args.http_host, args.http_port)
        print(f"status page {web.url} (Prometheus {web.url}metrics)", file=sys.stderr,
              flush=True)
    try:
        node.run()
    finally:
        if web is not None:
            web.stop()
    metrics = Path(args.metrics) if args.metrics else Path(args.state) / "metrics.json"
    config = run_cfg.to_json()
    config["strategy"] = svc.strategy_cfg.to_json()
    metrics.write_text(json.dumps(svc.metrics_json(config), indent=1))
    if args.out:
        save_final(Path(args.out), svc.global_adapter, loaded.fingerprint, loaded.name)
    log.info("aggregator done: %d rounds; metrics in %s", svc.round, metrics)
    return 0
