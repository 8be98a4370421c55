"""`edge-rt` command line: one module per subcommand, each with `register(subparsers)`.

Bad input raises `UserError`; `main` prints it as one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge_runtime.errors import UserError

__all__ = ["main", "build_parser", "COMMANDS"]

# Subcommand modules under edge_runtime.cli, in help order.
COMMANDS: tuple[str, ...] = (
    "pull",
    "train",
    "generate",
    "export",
    "eval",
    "profile",
    "demo", "agent", "aggregator",
    "data", "simulate", "compare",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own exit code for a bad flag is 2; keep it, one line, plus a hint.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-rt", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"edge_runtime.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"edge-rt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-rt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
