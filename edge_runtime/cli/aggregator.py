"""`edge-rt aggregator`: announce rounds, validate and merge device updates over MQTT."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_runtime.cli.common import positive_float, positive_int
from edge_runtime.cli.fleet_common import add_mqtt_args, mqtt_from_args
from edge_runtime.config import FleetConfig, QuantMode, parse_targets

log = logging.getLogger("edge_runtime.aggregator")


def add_round_args(p: argparse.ArgumentParser) -> None:
    """Round and plan flags (shared with `edge-rt demo`)."""
    p.add_argument("--strategy", default="hetlora",
                   choices=["fedavg", "hetlora", "flexlora", "sa-fedlora", "legend"])
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--round-timeout-s", type=positive_float, default=60.0)
    p.add_argument("--model", default="tiny",
                   help="GGUF file, HF folder, pulled name (smollm2-135m) or 'tiny'")
    p.add_argument("--quant", default="none", choices=[m.value for m in QuantMode])
    p.add_argument("--rank-max", type=positive_int, default=8, help="global adapter rank")
    p.add_argument("--depth", type=positive_int, default=None,
                   help="global adapter depth (default: min(4, blocks))")
    p.add_argument("--targets", default="q,v", help="LoRA targets among q,k,v,o,gate,up,down")
    p.add_argument("--alpha", type=positive_float, default=16.0)
    p.add_argument("--local-steps", type=positive_int, default=10)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=64)
    p.add_argument("--compression", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--chunk-size", type=positive_int, default=64 * 1024)
    p.add_argument("--max-update-mb", type=positive_float, default=64.0)
    p.add_argument("--max-update-norm", type=positive_float, default=1e4)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aggregator", help="run the fleet aggregator (rounds over MQTT)")
    add_mqtt_args(p, required=True)
    add_round_args(p)
    p.add_argument("--min-clients", type=positive_int, default=1)
    p.add_argument("--max-clients", type=int, default=0, help="per round (0 = all online)")
    p.add_argument("--wait-for-clients-s", type=positive_float, default=120.0)
    p.add_argument("--state", required=True, metavar="DIR",
                   help="state directory (resumed if it exists)")
    p.add_argument("--eval", metavar="FILE.jsonl", help="held-out rows for eval_loss per round")
    p.add_argument("--profiles", metavar="DIR",
                   help="declared device-class profiles (<class>.json; default: profiles/)")
    p.add_argument("--reference-profile", metavar="FILE",
                   help="a profile measured with `edge-rt profile` for this model: plans "
                   "declared classes with the profiler's cost model")
    p.add_argument("--out", metavar="DIR", help="write the final global adapter here")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads for merging (raise for big FlexLoRA SVDs)")
    p.add_argument("--metrics", metavar="FILE", help="write metrics JSON here (default STATE/metrics.json)")
    p.set_defaults(func=run)


def fleet_config(args: argparse.Namespace, min_clients: int, max_clients: int = 0,
                 wait_s: float = 120.0) -> FleetConfig:
    return FleetConfig(strategy=args.strategy, rounds=args.rounds, min_clients=min_clients,
                       max_clients=max_clients, round_timeout_s=args.round_timeout_s,
                       max_update_bytes=int(args.max_update_mb * (1 << 20)),
                       max_update_norm=args.max_update_norm, chunk_size=args.chunk_size,
                       compression=args.compression, wait_for_clients_s=wait_s)


def train_settings(args: argparse.Namespace) -> dict:
    return {"steps": args.local_steps, "lr": args.lr, "batch_size": args.batch_size,
            "seq_len": args.seq_len}


def run_config(args: argparse.Namespace, cfg: FleetConfig) -> dict:
    """The `config` block of metrics.json."""
    return {"model": args.model, "strategy": cfg.strategy, "rounds": cfg.rounds,
            "min_clients": cfg.min_clients, "round_timeout_s": cfg.round_timeout_s,
            "rank_max": args.rank_max, "depth": args.depth, "targets": args.targets,
            "alpha": args.alpha, "train": train_settings(args), "compression": cfg.compression,
            "chunk_size": cfg.chunk_size}


def run(args: argparse.Namespace) -> int:
    from edge_runtime.checkpoints import load_model
    from edge_runtime.data import load_jsonl
    from edge_runtime.fleet.agent import save_final
    from edge_runtime.fleet.build import build_service
    from edge_runtime.fleet.server import AggregatorNode

    cfg = fleet_config(args, args.min_clients, args.max_clients, args.wait_for_clients_s)
    loaded = load_model(args.model, QuantMode.parse(args.quant))
    depth = args.depth or min(4, loaded.model.config.n_layers)
    args.depth = depth
    svc = build_service(loaded, cfg, Path(args.state), r_max=args.rank_max, depth=depth,
                        targets=parse_targets(args.targets), alpha=args.alpha,
                        train=train_settings(args),
                        eval_examples=load_jsonl(args.eval) if args.eval else None,
                        seq_len=args.seq_len,
                        profiles_dir=Path(args.profiles) if args.profiles else None,
                        reference=Path(args.reference_profile) if args.reference_profile
                        else None)

    def progress(rec) -> None:  # type: ignore[no-untyped-def]
        print(f"round {rec.round}: {rec.participants} updates, eval_loss {rec.eval_loss}, "
              f"up {rec.bytes_up} B, down {rec.bytes_down} B, {rec.sim_time_s:.1f} s, "
              f"rejected {rec.rejected}", file=sys.stderr, flush=True)

    node = AggregatorNode(svc, mqtt_from_args(args), on_round=progress,
                          wait_for_clients_s=cfg.wait_for_clients_s, threads=args.threads)
    node.run()
    metrics = Path(args.metrics) if args.metrics else Path(args.state) / "metrics.json"
    metrics.write_text(json.dumps(svc.metrics_json(run_config(args, cfg)), indent=1))
    if args.out:
        save_final(Path(args.out), svc.global_adapter, loaded.fingerprint, loaded.name)
    log.info("aggregator done: %d rounds; metrics in %s", svc.round, metrics)
    return 0
