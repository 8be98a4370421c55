"""`edge-rt simulate`: an in-process fleet (no MQTT) training a real model with a strategy.

Writes DIR/metrics.json ({"strategy", "config", "rounds": [{"round", "eval_loss",
"bytes_up", "bytes_down", "sim_time_s", "participants"}]}; round 0 is the base model,
bytes are per round, sim_time_s is cumulative) and DIR/metrics.png when matplotlib is
importable.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from edge_runtime.config import SimulateConfig
from edge_runtime.data import Example, load_jsonl
from edge_runtime.errors import DataError
from edge_runtime.fl.registry import STRATEGIES

__all__ = ["register", "run", "load_client_data", "plot_metrics"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="simulate a federated fleet in-process",
                              description=__doc__)
    p.add_argument("--strategy", choices=STRATEGIES, required=True)
    p.add_argument("--model", default="tiny", help="tiny | smollm2-135m | GGUF path | HF folder")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", required=True,
                   help="a folder from `edge-rt data pull` (client_*/train.jsonl, test.jsonl) "
                        "or a dataset name (sentiment, fortunes, chatterbot, bigbench:T1,T2)")
    p.add_argument("--partition", default=None, help="when --data is a name: domain|task|"
                   "dirichlet|iid")
    p.add_argument("--alpha-dirichlet", type=float, default=0.5)
    p.add_argument("--fraction", type=float, default=1.0, help="clients selected per round")
    p.add_argument("--dropout", type=float, default=0.0, help="P(selected client never reports)")
    p.add_argument("--straggler", type=float, default=0.0, help="P(client is 4x slower)")
    p.add_argument("--classes", default=",".join(SimulateConfig().device_classes),
                   help="declared device profiles (profiles/*.json), comma-separated")
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--r-min", type=int, default=4)
    p.add_argument("--r-max", type=int, default=16)
    p.add_argument("--rank", type=int, default=None, help="fedavg's homogeneous rank")
    p.add_argument("--targets", default="q,v")
    p.add_argument("--depth", type=int, default=0, help="non-LEGEND depth (0 = all blocks)")
    p.add_argument("--deadline", type=float, default=None, help="round deadline, simulated s")
    p.add_argument("--eval-max", type=int, default=64)
    p.add_argument("--quant", default="none", help="frozen base: none | int8 | int4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run)


def load_client_data(data: str, n_clients: int, *, partition: str | None, alpha: float,
                     seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Client train splits and the global held-out rows from a folder or a dataset name."""
    folder = Path(data)
    if not folder.is_dir():
        from edge_runtime.cli.data import default_out
        from edge_runtime.datasets.build import pull_dataset

        folder = default_out(data, partition, n_clients, seed)
        if not (folder / "manifest.json").is_file():
            pull_dataset(data, folder, n_clients=n_clients, partition=partition, alpha=alpha,
                         seed=seed)
    dirs = sorted(d for d in folder.glob("client_*") if d.is_dir())
    if not dirs:
        raise DataError(f"{folder} has no client_*/train.jsonl; make one with "
                        "`edge-rt data pull NAME --clients N --out DIR`")
    train = [load_jsonl(d / "train.jsonl") for d in dirs[:n_clients]]
    test_path = folder / "test.jsonl"
    test = load_jsonl(test_path) if test_path.is_file() else [
        e for d in dirs[:n_clients] for e in load_jsonl(d / "test.jsonl")]
    return train, test


def plot_metrics(metrics: dict, path: Path) -> bool:
    """Loss vs round, vs cumulative bytes, vs simulated time. False if matplotlib is absent."""
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
                                   [r["sim_time_s"] for r in rows]),
                            ("round", "MB sent (up + down)", "simulated time (s)"), strict=True):
        ax.plot(x, loss, marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss")
    fig.suptitle(f"{metrics['strategy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    from edge_runtime.checkpoints import load_model
    from edge_runtime.fl.devices import load_device_classes
    from edge_runtime.fl.simulator import run_simulation

    cfg = SimulateConfig(
        strategy=args.strategy, clients=args.clients, rounds=args.rounds,
        fraction=args.fraction, dropout=args.dropout, straggler=args.straggler,
        device_classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
        seq_len=args.seq_len, r_min=args.r_min, r_max=args.r_max, rank=args.rank,
        targets=tuple(args.targets.split(",")), depth=args.depth, deadline_s=args.deadline,
        eval_max=args.eval_max, seed=args.seed)
    random.seed(cfg.seed)
    classes = load_device_classes(cfg.device_classes)
    train, test = load_client_data(args.data, cfg.clients, partition=args.partition,
                                   alpha=args.alpha_dirichlet, seed=cfg.seed)
    loaded = load_model(args.model, args.quant)
    metrics = run_simulation(loaded.model, loaded.tokenizer, train, test, cfg, classes)
    metrics["config"].update({"model": loaded.name, "data": args.data, "quant": args.quant})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plotted = plot_metrics(metrics, args.out / "metrics.png")
    first, last = metrics["rounds"][0], metrics["rounds"][-1]
    up = sum(r["bytes_up"] for r in metrics["rounds"]) / 1e6
    print(f"{cfg.strategy}: eval loss {first['eval_loss']:.4f} -> {last['eval_loss']:.4f} "
          f"in {cfg.rounds} rounds, {up:.2f} MB up, {last['sim_time_s']:.1f} s simulated "
          f"-> {args.out / 'metrics.json'}" + ("" if plotted else " (no plot: pip install "
                                                                   "matplotlib)"))
    return 0
