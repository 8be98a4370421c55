"""`edge-rt compare COMPARE.toml --out DIR`: methods x seeds on one simulated fleet, cached,
with a report (mean ± std over seeds at the final round; see `edge_runtime.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare federated methods over seeds (cached runs)",
                       description=__doc__)
    p.add_argument("config", metavar="COMPARE.toml")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a [base] setting, e.g. --set fleet.rounds=2")
    p.add_argument("--methods", metavar="A,B",
                   help="run and report only these methods of the file (the others' cached "
                   "runs are kept)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.compare import load_compare, run_compare
    from edge_runtime.config import parse_override
    from edge_runtime.errors import ConfigError

    overrides = [parse_override(s) for s in args.set]
    spec = load_compare(args.config, overrides)
    if args.methods:
        want = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in want if m not in spec.methods]
        if unknown or not want:
            raise ConfigError(f"--methods names {unknown[0] if unknown else 'nothing'}, which "
                              f"{args.config} does not define; it has "
                              f"{', '.join(spec.methods)}")
        spec.methods = {m: spec.methods[m] for m in want}
    report = run_compare(spec, args.out)
    print((args.out / "report.md").read_text(), end="")
    print(f"{len(report['methods'])} methods x {len(spec.seeds)} seeds -> {args.out}")
    return 0
