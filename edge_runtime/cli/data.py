"""`edge-rt data pull NAME`: fetch public text data (pinned, sha256-checked) into JSONL splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_runtime.datasets.build import PARTITIONS, parse_data_name, pull_dataset
from edge_runtime.datasets.sources import data_cache_dir

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="fetch benchmark datasets into per-client JSONL",
                              description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    pull = sub.add_parser("pull", help="download, check, partition and write JSONL splits")
    pull.add_argument("name", help="sentiment | fortunes | chatterbot | bigbench:TASK[,TASK...]")
    pull.add_argument("--out", type=Path, default=None,
                      help="output directory (default: <cache>/splits/<name>-<partition>-c<N>-s<S>)")
    pull.add_argument("--clients", type=int, default=3, help="number of clients (default 3)")
    pull.add_argument("--partition", choices=PARTITIONS, default=None,
                      help="domain/task: one group per client; dirichlet: label skew; iid "
                           "(default: domain for sentiment/chatterbot, dirichlet for fortunes, "
                           "task for bigbench)")
    pull.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    pull.add_argument("--seed", type=int, default=0)
    pull.add_argument("--test-fraction", type=float, default=0.2)
    pull.add_argument("--max-per-task", type=int, default=1000,
                      help="bigbench: at most this many examples per task (seeded sample)")
    pull.set_defaults(func=run)


def default_out(name: str, partition: str | None, clients: int, seed: int) -> Path:
    slug = parse_data_name(name).slug
    return data_cache_dir() / "splits" / f"{slug}-{partition or 'default'}-c{clients}-s{seed}"


def run(args: argparse.Namespace) -> int:
    out = args.out or default_out(args.name, args.partition, args.clients, args.seed)
    man = pull_dataset(args.name, out, n_clients=args.clients, partition=args.partition,
                       alpha=args.alpha, seed=args.seed, test_fraction=args.test_fraction,
                       max_per_task=args.max_per_task)
    print(f"{args.name}: {man['num_records']} rows, partition {man['partition']}, "
          f"{len(man['clients'])} clients -> {out}")
    for c in man["clients"]:
        groups = ", ".join(f"{g}:{n}" for g, n in sorted(c["groups"].items()))
        print(f"  {c['dir']}: train {c['train']}, test {c['test']} ({groups})")
    return 0
