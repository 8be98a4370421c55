"""`edge-rt pull NAME`: fetch a known model into the cache; stdout is only its path."""

from __future__ import annotations

import argparse

from edge_runtime.checkpoints.pull import KNOWN_MODELS, pull

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="download a known model (hash-checked) into the cache; prints its path"
    )
    p.add_argument("name", metavar="NAME", choices=sorted(KNOWN_MODELS),
                   help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(pull(args.name))
    return 0
