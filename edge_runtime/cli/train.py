"""`edge-rt train`: fine-tune LoRA on a local JSONL file and write a PEFT adapter folder."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge_runtime.cli.common import add_model_args, load_from_args, positive_float, positive_int
from edge_runtime.config import LoRAPlan, TrainConfig, parse_targets
from edge_runtime.errors import ConfigError, UserError

log = logging.getLogger("edge_runtime.train")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune LoRA on local data; writes a PEFT adapter folder")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training rows")
    p.add_argument("--rank", type=positive_int, help="LoRA rank (default 8, or the profile's)")
    p.add_argument("--depth", type=positive_int,
                   help="LoRA on the top DEPTH blocks (default 4, or the profile's)")
    p.add_argument("--targets", help="modules among q,k,v,o,gate,up,down (default q,v)")
    p.add_argument("--alpha", type=positive_float, help="LoRA alpha (scale = alpha/rank)")
    p.add_argument("--profile", metavar="FILE", help="device profile JSON: train with its plan")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--packing", action="store_true", help="pack rows into full sequences")
    p.add_argument("--prefix-cache-mb", type=float, default=TrainConfig.prefix_cache_mb,
                   metavar="MB", help="keep the frozen blocks' output per example up to MB so "
                   "later epochs skip them (0: off; default %(default)s)")
    p.add_argument("--time-budget-s", type=positive_float,
                   help="stop cleanly before this many seconds of training")
    p.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: the profile's, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    p.set_defaults(func=run)


def read_profile(path_text: str) -> dict:
    path = Path(path_text)
    try:
        profile = json.loads(path.read_text())
        dict(profile["plan"])
    except FileNotFoundError:
        raise UserError(f"profile {path} does not exist; run `edge-rt profile` first") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"profile {path} has no valid 'plan'; regenerate it with "
                        "`edge-rt profile MODEL --out FILE`") from None
    return dict(profile)


def plan_from_args(args: argparse.Namespace, n_layers: int) -> LoRAPlan:
    """The LoRA plan: the profile's, with explicit flags taking precedence."""
    base: dict = dict(read_profile(args.profile)["plan"]) if args.profile else {}
    if args.rank is not None:
        base["rank"] = args.rank
        base.pop("layer_ranks", None)
        base.pop("module_ranks", None)
    if args.depth is not None:
        base["depth"] = args.depth
    if args.targets is not None:
        base["targets"] = list(parse_targets(args.targets))
    if args.alpha is not None:
        base["alpha"] = args.alpha
    base.setdefault("seed", args.seed)
    plan = LoRAPlan.from_json(base)
    if plan.depth > n_layers:
        raise ConfigError(f"--depth {plan.depth} is above the model's {n_layers} blocks; "
                          f"pass --depth {n_layers} or less")
    return plan


def run(args: argparse.Namespace) -> int:
    import torch

    from edge_runtime.adapter_io import save_adapter
    from edge_runtime.data import load_jsonl
    from edge_runtime.lora import apply_lora, get_adapter
    from edge_runtime.trainer import train

    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      seq_len=args.seq_len, grad_accum=args.grad_accum,
                      time_budget_s=args.time_budget_s, seed=args.seed, packing=args.packing,
                      prefix_cache_mb=args.prefix_cache_mb)
    threads = args.threads
    if threads is None and args.profile:
        # Train at the thread count the profile was measured with: its times assume it.
        threads = read_profile(args.profile).get("device", {}).get("torch_threads")
    if threads:
        torch.set_num_threads(int(threads))
    examples = load_jsonl(args.data)
    loaded = load_from_args(args)
    plan = plan_from_args(args, loaded.model.config.n_layers)
    apply_lora(loaded.model, plan)
    out = Path(args.out)
    log.info("model %s (%s), plan rank=%d depth=%d targets=%s, %d rows", loaded.name,
             args.quant, plan.rank, plan.depth, ",".join(plan.targets), len(examples))
    result = train(loaded.model, loaded.tokenizer, examples, cfg,
                   checkpoint_dir=out / "checkpoint", resume=args.resume, checkpoint_every=10)
    save_adapter(out, get_adapter(loaded.model), fingerprint=loaded.fingerprint,
                 base_name=loaded.name)
    (out / "train_log.json").write_text(json.dumps(
        {"plan": plan.to_json(), "train": cfg.__dict__, "result": result.to_json()}, indent=1))
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    print(f"trained {result.steps} steps in {result.elapsed_s:.1f}s, loss {first:.4f} -> "
          f"{last:.4f}, peak RSS {result.peak_rss_mb:.0f} MB"
          + (" (stopped at the time budget)" if result.stopped_early else ""), file=sys.stderr)
    print(str(out))
    return 0
